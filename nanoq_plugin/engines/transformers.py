"""transformers integration: the `nano` quantization config and HfQuantizer, registered on import.

`_process_model_before_weight_loading` swaps every `nn.Linear` / `nn.Embedding` named in
`quantization_config["modules"]` for a `NanoLinear` / `NanoEmbedding` whose parameters carry the
checkpoint's names (`qweight`, `scales`, `zeros`), so the ordinary weight loader fills them, and a head tied
to a quantized table for a `NanoTiedHead`. After loading, each module is repacked once for its kernel
(`kernels.ops.prepare_linear`: PyTorch's int8/int4 kernels on the CPU, Triton on CUDA).

Mixture-of-experts blocks: transformers holds a block's experts in one module with fused 3-D parameters
(`Qwen3MoeExperts.gate_up_proj [E, 2I, H]`, ...), found here as in `format.expert_tensors` (any module with 3-D
parameters whose checkpoint stores them per expert), never by family. Where a checkpoint quantizes its experts,
that module is replaced by a `NanoExperts` holding each expert's stored linears under the names transformers'
loader gives the checkpoint's per-expert tensors (`3.gate_proj.qweight`; its fused-expert conversion matches
only `.weight` keys, so it leaves them alone), computing what the replaced module computes (transformers'
experts contract: `_apply_gate`, `has_gate`, `has_bias`), expert by expert; the router stays transformers' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format.checkpoint import check_loaded_finite
from ..format.expert_tensors import ExpertRole, ExpertsModule, find_experts_modules
from ..format.layout import param_specs
from ..format.quant_config import QUANT_METHOD, NanoQuantConfig
from ..format.schemes import Scheme
from ..format.validate import load_nano_checkpoint
from ..errors import NanoqError
from ..kernels.ops import PreparedLinear, apply_linear, gather_embedding, prepare_linear, quantized_embedding, quantized_linear


class NanoConfig(QuantizationConfigMixin):
    """transformers view of a nano `quantization_config` (the JSON is kept verbatim)."""

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = 1, schemes=None, modules=None,
                 tied_lm_head: str | None = None, **kwargs):
        self.quant_method = quant_method
        self.format_version = format_version
        self.schemes = schemes or {}
        self.modules = modules or {}
        self.tied_lm_head = tied_lm_head

    def to_dict(self) -> dict:
        out = {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "schemes": self.schemes,
            "modules": self.modules,
        }
        if self.tied_lm_head is not None:
            out["tied_lm_head"] = self.tied_lm_head
        return out

    def parsed(self) -> NanoQuantConfig:
        """The validated format-layer config."""
        return NanoQuantConfig.from_dict(self.to_dict(), "config.json: quantization_config")


class _NanoStored(nn.Module):
    """Stored tensors of one quantized module (named as in `format.layout.param_specs`) and, after
    `prepare()`, the same weight repacked for the fastest kernel that runs it (the stored copy is freed)."""

    is_embedding = False

    def __init__(self, out_features: int, in_features: int, scheme: Scheme, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features, self.scheme, self.act_dtype = out_features, in_features, scheme, act_dtype
        self.prepared: PreparedLinear | None = None
        for name, spec in param_specs(scheme, out_features, in_features).items():
            self.register_parameter(name, nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False))

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters(recurse=False) if name != "bias"}

    def prepare(self, where: str) -> None:
        """Repack once for `kernels.ops` (call after the weights are loaded)."""
        stored = self.stored()
        self.prepared = prepare_linear(stored, self.scheme, self.out_features, self.in_features, self.act_dtype,
                                       is_embedding=self.is_embedding, where=where)
        for name in stored:
            delattr(self, name)
        for name, tensor in self.prepared.tensors.items():
            self.register_buffer(f"prepared_{name}", tensor, persistent=False)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x [..., in_features]` -> `[..., out_features]` in x.dtype."""
        if self.prepared is not None:
            return apply_linear(x, self.prepared, bias)
        return quantized_linear(x, self.stored(), self.scheme, bias)

    def extra_repr(self) -> str:
        kernel = self.prepared.kernel if self.prepared else "not prepared"
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}, kernel={kernel}"


class NanoLinear(_NanoStored):
    """A linear stored in a nano scheme."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool, bias_dtype: torch.dtype):
        super().__init__(out_features, in_features, scheme, bias_dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in_features]` -> `[..., out_features]` in x.dtype."""
        return self.linear(x, self.bias)


class NanoEmbedding(_NanoStored):
    """A quantized token embedding table `[num_embeddings, embedding_dim]`, stored like a linear with
    num_embeddings outputs; lookups dequantize only the rows they read."""

    is_embedding = True

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, dtype: torch.dtype):
        super().__init__(num_embeddings, embedding_dim, scheme, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids [...]` (int) -> `[..., embedding_dim]` in the model dtype."""
        if self.prepared is not None:
            return gather_embedding(ids, self.prepared, self.act_dtype)
        return quantized_embedding(ids, self.stored(), self.scheme, self.in_features, self.act_dtype)


class NanoTiedHead(nn.Module):
    """An LM head that computes logits with a `NanoEmbedding`'s quantized table (no copy of its own)."""

    def __init__(self, table: NanoEmbedding):
        super().__init__()
        self._table = [table]  # a list, so the table is not registered (and counted) twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., embedding_dim]` -> logits `[..., num_embeddings]` in x.dtype."""
        return self._table[0].linear(x)


class NanoExperts(nn.Module):
    """The experts of one MoE block with quantized projections, in place of transformers' fused experts module.

    Each quantized role (e.g. `gate_up_proj`, `[E, out, in]` in the replaced module) is held per expert as the
    `NanoLinear`s the checkpoint stores (`layout.roles[i].parts[e]`, e.g. `3.gate_proj` and `3.up_proj`, whose
    outputs fill rows `part.rows` of expert 3's fused weight); a role the checkpoint keeps float stays the replaced
    module's 3-D parameter, as do biases. Plain attributes of the replaced module (`num_experts`, `has_gate`,
    `act_fn`, a family's gating constants) are kept, and its class's `_apply_gate` gates.
    """

    def __init__(self, replaced: nn.Module, layout: ExpertsModule, schemes: dict[str, Scheme | None],
                 dtype: torch.dtype):
        super().__init__()
        kind = type(replaced).__name__
        gate = getattr(type(replaced), "_apply_gate", None)
        if gate is None or not hasattr(replaced, "has_gate"):
            raise NanoqError(f"{kind} '{layout.name}' does not follow transformers' experts contract "
                             "(use_experts_implementation: has_gate, _apply_gate): its quantized experts cannot run")
        for key, value in vars(replaced).items():
            if not key.startswith("_") and key != "training" and not isinstance(value, torch.Tensor):
                setattr(self, key, value)
        for key, child in replaced.named_children():
            self.add_module(key, child)  # act_fn
        self._gate, self._layout, self._kind = gate, layout, kind
        self._roles = {role.param: role for role in layout.roles}
        self._quantized: dict[str, list[list[NanoLinear]]] = {}
        for name, param in replaced.named_parameters(recurse=False):
            if schemes.get(name) is None:
                self.register_parameter(name, param)
        for role in layout.roles:
            scheme = schemes[role.param]
            if scheme is None:
                continue
            per_expert = []
            for parts in role.parts:
                linears = []
                for part in parts:
                    linear = NanoLinear(role.in_features, len(part.rows), scheme, False, dtype)
                    holder = self
                    *path, leaf = part.local.split(".")
                    for step in path:
                        if step not in holder._modules:
                            holder.add_module(step, nn.Module())
                        holder = holder._modules[step]
                    holder.add_module(leaf, linear)
                    linears.append(linear)
                per_expert.append(linears)
            self._quantized[role.param] = per_expert

    def _project(self, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """`x [T, in]` through expert `expert`'s slice of fused parameter `param` (and its bias) -> `[T, out]`."""
        linears = self._quantized.get(param)
        if linears is None:
            weight = getattr(self, param)[expert]
            out = x @ weight if self._roles[param].transposed else nn.functional.linear(x, weight)
        else:
            parts = self._roles[param].parts[expert]
            outs = [linear(x) for linear in linears[expert]]
            if all(part.rows.step == 1 for part in parts) and all(
                    a.rows.stop == b.rows.start for a, b in zip(parts, parts[1:])):
                out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            else:  # interleaved rows
                out = x.new_empty(*x.shape[:-1], self._roles[param].out_features)
                for part, part_out in zip(parts, outs):
                    out[..., part.rows.start:part.rows.stop:part.rows.step] = part_out
        if getattr(self, "has_bias", False):
            out = out + getattr(self, f"{param}_bias")[expert]
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """`hidden_states [T, H]`, the router's `top_k_index [T, k]` (int) and `top_k_weights [T, k]` ->
        `[T, H]` in hidden_states.dtype: each token's experts' outputs, weighted and summed."""
        final = torch.zeros_like(hidden_states)
        first = "gate_up_proj" if self.has_gate else "up_proj"
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # an expert-parallel sentinel
                continue
            # the replaced module's order (by top-k slot, then token), so sums accumulate in the same order
            top_k_pos, token_idx = torch.where((top_k_index == expert).T)
            out = self._project(first, expert, hidden_states[token_idx])
            out = self._gate(self, out) if self.has_gate else self.act_fn(out)
            out = self._project("down_proj", expert, out) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        roles = ", ".join(f"{param}={'float' if param not in self._quantized else 'nano'}" for param in self._roles)
        return f"replaces={self._kind}, experts={self.num_experts}, {roles}"


def replace_experts(model: nn.Module, quant_config: NanoQuantConfig) -> set[str]:
    """Swap each experts module with quantized projections for a `NanoExperts`; returns the quantized module
    names (checkpoint names) it covers. NanoqError where a role's experts are not all in one scheme."""
    covered: set[str] = set()
    for layout in find_experts_modules(model):
        schemes: dict[str, Scheme | None] = {}
        for role in layout.roles:
            found = {quant_config.modules.get(module) for module in role.modules()}
            if len(found) > 1:
                names = sorted(scheme.name if scheme else "float" for scheme in found)
                raise NanoqError(f"quantization_config stores the experts' {role.param} of MoE block "
                                 f"'{layout.block}' in {len(found)} schemes ({', '.join(names)}): one is required")
            schemes[role.param] = found.pop()
        if all(scheme is None for scheme in schemes.values()):
            continue
        replaced = model.get_submodule(layout.name)
        dtype = next(iter(replaced.parameters())).dtype
        device = next(iter(replaced.parameters())).device
        with torch.device(device):
            new = NanoExperts(replaced, layout, schemes, dtype)
        parent_name, _, child_name = layout.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)
        covered.update(module for module in layout.modules() if module in quant_config.modules)
    return covered


def replace_modules(model: nn.Module, quant_config: NanoQuantConfig) -> int:
    """Swap each module named in `quant_config` (nn.Linear or nn.Embedding) for its nano twin on the same
    device, experts modules with quantized projections for `NanoExperts`, and a tied LM head for a
    `NanoTiedHead`; returns the number of modules swapped (every quantized expert projection counting one)."""
    experts = replace_experts(model, quant_config)
    replaced = len(experts)
    for name, scheme in quant_config.modules.items():
        if name in experts:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child_name, None)
        if isinstance(module, nn.Linear):
            with torch.device(module.weight.device):
                new = NanoLinear(module.in_features, module.out_features, scheme, module.bias is not None,
                                 module.weight.dtype)
        elif isinstance(module, nn.Embedding):
            with torch.device(module.weight.device):
                new = NanoEmbedding(module.num_embeddings, module.embedding_dim, scheme, module.weight.dtype)
        else:
            raise NanoqError(f"quantization_config names '{name}', which is not an nn.Linear or nn.Embedding "
                             f"in this model ({type(module).__name__})")
        setattr(parent, child_name, new)
        replaced += 1
    if quant_config.tied_lm_head is not None:
        table = model.get_submodule(quant_config.tied_lm_head)
        model.set_output_embeddings(NanoTiedHead(table))
    return replaced


def _forget_ties_of(model: nn.Module, modules: set[str]) -> None:
    """Drop transformers' parameter ties that involve swapped modules: a quantized table has no `weight` to
    tie, and a tied head already computes with it (`NanoTiedHead`)."""
    ties = getattr(model, "all_tied_weights_keys", None)
    if not ties:
        return
    swapped = tuple(f"{m}." for m in modules)
    model.all_tied_weights_keys = {t: s for t, s in ties.items() if not (t.startswith(swapped) or s.startswith(swapped))}


def prepare_modules(model: nn.Module) -> None:
    """Repack every nano module for its kernel (after the weights are loaded)."""
    for name, module in model.named_modules():
        if isinstance(module, _NanoStored):
            module.prepare(name)


class NanoHfQuantizer(HfQuantizer):
    """Loads pre-quantized nano checkpoints (quantizing happens offline with `nanoq quantize`)."""

    requires_calibration = True

    _tensors = None  # the validated checkpoint folder's tensors
    _float_dtypes = None  # float parameter -> the dtype the model was built with

    def update_tp_plan(self, config):
        """Validate a local checkpoint folder here, the first hook that sees the config (and the folder it came
        from) before transformers resolves the shard files: an index naming shards outside the folder, or a
        missing one, is refused before transformers opens them."""
        folder = Path(str(getattr(config, "_name_or_path", "") or ""))
        if folder.name and (folder / "config.json").is_file():
            self._tensors = load_nano_checkpoint(folder).tensors
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Validate the checkpoint folder (tensors vs manifest vs config vs the model's own tensors) unless
        `update_tp_plan` did, then swap in `NanoLinear`s."""
        if checkpoint_files:
            folder = Path(checkpoint_files[0]).parent
            if self._tensors is None or self._tensors.directory.resolve() != folder.resolve():
                self._tensors = load_nano_checkpoint(folder).tensors
        quant_config = self.quantization_config.parsed()
        replace_modules(model, quant_config)
        swapped = set(quant_config.modules)
        if quant_config.tied_lm_head is not None:
            swapped.add("lm_head")
        _forget_ties_of(model, swapped)
        # transformers loads a renamed or converted key of a pre-quantized checkpoint in its stored dtype (Mixtral's
        # `block_sparse_moe.gate.weight`, a float expert role merged into its fused parameter): remember the dtype
        # the model asked for, to cast those back after loading
        self._float_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.is_floating_point()}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Refuse a NaN or infinite loaded value (naming its file, tensor and index), then repack for the kernels."""
        if self._tensors is not None:
            check_loaded_finite(model.state_dict(), self._tensors)
        for name, param in model.named_parameters():
            wanted = (self._float_dtypes or {}).get(name)
            if wanted is not None and param.dtype != wanted:
                param.data = param.data.to(wanted)
        prepare_modules(model)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register `nano` with transformers; safe to call more than once."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NanoConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NanoHfQuantizer)
