"""transformers integration: the `nano` quantization config and HfQuantizer, registered on import.

`_process_model_before_weight_loading` swaps every `nn.Linear` / `nn.Embedding` named in
`quantization_config["modules"]` for a `NanoLinear` / `NanoEmbedding` whose parameters carry the
checkpoint's names (`qweight`, `scales`, `zeros`), so the ordinary weight loader fills them, and a head tied
to a quantized table for a `NanoTiedHead`. After loading, each module is repacked once for its kernel
(`kernels.ops.prepare_linear`: PyTorch's int8/int4 kernels on the CPU, Triton on CUDA).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format.checkpoint import check_loaded_finite
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


def replace_modules(model: nn.Module, quant_config: NanoQuantConfig) -> int:
    """Swap each module named in `quant_config` (nn.Linear or nn.Embedding) for its nano twin on the same
    device, and a tied LM head for a `NanoTiedHead`; returns the number of modules swapped."""
    replaced = 0
    for name, scheme in quant_config.modules.items():
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
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Refuse a NaN or infinite loaded value (naming its file, tensor and index), then repack for the kernels."""
        if self._tensors is not None:
            check_loaded_finite(model.state_dict(), self._tensors)
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
