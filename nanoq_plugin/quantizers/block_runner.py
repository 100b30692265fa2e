"""Run one decoder block of a checkpoint on its own (float32, the model's own decoder-layer class), so that
calibrated quantizers can capture each linear's inputs and feed the next block the quantized outputs.

Nothing here knows a family. What a block is called with — rotary position embeddings (per layer type, e.g.
Gemma 3's local and global bases), the attention mask its layer type needs (sliding windows) — is what the
model's own forward passes it: a one-block "shell" of the model (its config with one layer of that layer type,
a one-token vocabulary, uninitialised weights) runs up to its block and the arguments are captured. What the
first block receives from the embedding (Gemma's √hidden, Granite's multiplier) is captured the same way.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import NanoqError
from ..format.tensor_spec import row_steps
from .anatomy import meta_model, transformers_config
from .architectures import Architecture, architecture_for
from .experts import memory_state
from .input_statistics import InputStatistics

# visit(group, statistics) sees the statistics of a group of linears' inputs (an input group of the
# architecture) before the block uses them; it may change the block (quantize the group, fold scales into the
# group's producer)
Visit = Callable[[tuple[str, ...], InputStatistics], None]
# visit_experts(x, top_k_index) sees a mixture-of-experts block's experts input `[T, H]` float32 (every token of
# every chunk) and the experts the model's own router sent each token to, `[T, top_k]` int64, before the block
# uses them; it may change the experts' weights.
VisitExperts = Callable[[torch.Tensor, torch.Tensor], None]


def resolve_device(device: str) -> torch.device:
    """`cpu` or `cuda` as a torch device; NanoqError for anything else or CUDA on a machine without it."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoqError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise NanoqError(f"--device {device!r}: choose cpu or cuda")
    return torch.device(device)


HALF = (torch.bfloat16, torch.float16)  # the 16-bit dtypes a block may hold its linears' weights in


def states_dtype_for(stored: torch.dtype) -> torch.dtype:
    """The dtype calibration hidden states are held in between blocks, for a checkpoint stored in `stored`:
    a 16-bit model's in bfloat16 (what the served model's residual stream holds, at half of float32's memory: an
    8B model's 128 x 512 calibration tokens are 0.5 GB; float16's range would overflow on outlier channels),
    others' in float32."""
    return torch.bfloat16 if stored in HALF else torch.float32


MAX_BATCH = 8  # windows per batch at most
ACTIVATION_BYTES = 64 * 2**20  # one float32 activation of a batch at most (when the batch is not set)


class _Captured(Exception):
    """Raised by a forward pre-hook once it has what it came for: the rest of the forward is not run."""


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class BlockRunner:
    """Builds block `i` from its stored tensors and runs hidden states `[B, L, H]` through it."""

    def __init__(self, config: dict, device: torch.device, batch_size: int | None = None,
                 arch: Architecture | None = None, states_dtype: torch.dtype = torch.float32) -> None:
        self.config = transformers_config(config)
        # the dtype hidden states are held in between blocks (`embed`, `forward`, `walk`); a block computes in
        # float32 whatever it is
        self.states_dtype = states_dtype
        self.config._attn_implementation = "sdpa"  # causal without an explicit mask where the layer type allows
        # an MoE block's experts run their own per-expert loop, which the quantizer hooks (grouped kernels need bf16)
        self.config._experts_implementation = "eager"
        self.arch = arch or architecture_for(config, "config.json")
        parent, _, attribute = self.arch.block_prefix.rpartition(".")
        meta = meta_model(self.config)
        self._base_path, self._blocks_attribute = parent, attribute
        self.layer_cls = type(getattr(meta.get_submodule(parent) if parent else meta, attribute)[0])
        self._final_norm_template = meta.get_submodule(self.arch.final_norm)
        self.device = device
        self.batch_size = batch_size  # windows per batch; None: as many as fit ACTIVATION_BYTES (`batch`)
        # the widest activation a block makes per token: the MLP's intermediate (an MoE's per-expert one is smaller)
        self._widest = max([self.config.hidden_size] + [value for key, value in vars(self.config).items()
                                                        if key.endswith("intermediate_size") and isinstance(value, int)])
        self._shells: dict[object, nn.Module] = {}
        self._kwargs: dict[tuple, dict] = {}

    def batch(self, length: int) -> int:
        """Windows of `length` tokens per batch: `batch_size` if given, else at most MAX_BATCH and as many as keep
        one float32 activation of the widest layer within ACTIVATION_BYTES (an MLP makes four at once; at 8B,
        8 windows of 512 tokens are 235 MB each)."""
        if self.batch_size is not None:
            return self.batch_size
        return max(1, min(MAX_BATCH, ACTIVATION_BYTES // (length * self._widest * 4)))

    # -- the block and its call arguments ---------------------------------------------------------------
    def layer_type(self, index: int):
        types = getattr(self.config, "layer_types", None)
        return types[index] if types else None

    def build(self, index: int, tensors: dict[str, torch.Tensor], prefix: str,
              stored_linears: bool = False) -> nn.Module:
        """Block `index` on the device, computing in float32; `tensors` are its stored tensors named
        `{prefix}.{index}.*`. Its parameters are float32 copies, except with `stored_linears` the weights of its
        linears stored in a 16-bit dtype: those are the stored tensors themselves (on the CPU, no copy) and each
        such linear casts its weight to float32 per call (`_computes_in_float32`), so that the block holds half
        of what it would (an 8B block's linears are 436 MB in bfloat16, 872 MB in float32)."""
        with torch.device("meta"):  # nothing allocated or initialised that the stored tensors then replace
            block = self.layer_cls(self.config, layer_idx=index)
        if any(True for _ in block.buffers()):  # a buffer made at construction has no stored value: make them all
            block = self.layer_cls(self.config, layer_idx=index).to(device=self.device, dtype=torch.float32)
        block.eval()
        block.nano_index = index
        head = f"{prefix}.{index}."
        state = {name[len(head):]: t for name, t in tensors.items() if name.startswith(head)}
        if self.arch.experts is not None:  # saved per-expert weights -> the layer's fused expert parameters
            state = memory_state(self.arch.experts, index, state)
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise NanoqError(f"block {index}: tensors do not match {self.layer_cls.__name__} "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        for module in block.modules():
            for name, parameter in module.named_parameters(recurse=False):
                kept = stored_linears and isinstance(module, nn.Linear) and name == "weight" and parameter.dtype in HALF
                parameter.data = parameter.data.to(device=self.device, dtype=parameter.dtype if kept else torch.float32)
            if isinstance(module, nn.Linear) and module.weight.dtype != torch.float32:
                module.forward = functools.partial(_computes_in_float32, module)
        return block

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        """The model's final norm (its own class, float32 on the device) with `weight [H]`."""
        norm = copy.deepcopy(self._final_norm_template).to_empty(device=self.device).to(torch.float32)
        norm.weight.data = weight.to(device=self.device, dtype=torch.float32)
        return norm.eval()

    def _shell(self, layer_type) -> nn.Module:
        """The model with one block of `layer_type` and a one-token vocabulary, uninitialised, on the device."""
        if layer_type not in self._shells:
            from transformers import AutoModelForCausalLM
            from transformers.initialization import no_init_weights

            config = copy.deepcopy(self.config)
            config.num_hidden_layers = 1
            if layer_type is not None:
                config.layer_types = [layer_type]
            config.vocab_size, config.pad_token_id = 1, None
            with no_init_weights(), torch.device(self.device):  # float32 as made: no copy of the block to convert
                shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            # its block is never run (the capture stops at its call), so its weights need not exist: at 8B they
            # are 0.9 GB in float32
            self._shell_block(shell).to("meta")
            self._shells[layer_type] = shell.eval()
        return self._shells[layer_type]

    def _shell_block(self, shell: nn.Module) -> nn.Module:
        base = shell.get_submodule(self._base_path) if self._base_path else shell
        return getattr(base, self._blocks_attribute)[0]

    def _capture(self, shell: nn.Module, **inputs) -> tuple[tuple, dict]:
        """(args, kwargs) the shell's forward calls its block with."""
        captured = {}

        def hook(module, args, kwargs):
            captured.update(args=args, kwargs=kwargs)
            raise _Captured

        handle = self._shell_block(shell).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            shell(**inputs, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise NanoqError(f"{type(shell).__name__}: its forward never reached its decoder block")
        return captured["args"], captured["kwargs"]

    def _call_kwargs(self, index: int, batch: int, length: int) -> dict:
        """The keyword arguments the model calls block `index` with for `[batch, length]` tokens."""
        key = (self.layer_type(index), batch, length)
        if key not in self._kwargs:
            shell = self._shell(key[0])
            embeds = torch.zeros((batch, length, self.config.hidden_size), device=self.device)
            with torch.no_grad():
                _, kwargs = self._capture(shell, inputs_embeds=embeds)
            kwargs = {name: value for name, value in kwargs.items() if name not in ("hidden_states", "past_key_values",
                                                                                   "past_key_value")}
            kwargs["use_cache"] = False
            self._kwargs[key] = kwargs
        return self._kwargs[key]

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """`ids [B, L]` -> the first block's input `[B, L, H]` in `states_dtype`, as the model computes it from its
        embedding table `embedding_weight [V, H]` (with any scale its embedding or forward applies)."""
        shell = self._shell(self.layer_type(0))
        table = shell.get_input_embeddings()
        unit = table.weight.data
        table.weight.data = torch.ones((1, self.config.hidden_size), device=self.device)
        try:
            scale = table(torch.zeros((1, 1), dtype=torch.long, device=self.device)).reshape(-1)
        finally:
            table.weight.data = unit
        ids = ids.to(embedding_weight.device)
        rows = torch.empty((*ids.shape, self.config.hidden_size), device=self.device, dtype=self.states_dtype)
        for start in range(0, ids.shape[0], MAX_BATCH):  # no second full-size copy in the table's dtype
            rows[start:start + MAX_BATCH] = embedding_weight[ids[start:start + MAX_BATCH]].to(self.device) * scale
        args, kwargs = self._capture(shell, inputs_embeds=rows)
        return (args[0] if args else kwargs["hidden_states"]).to(self.states_dtype)

    # -- running it -------------------------------------------------------------------------------------
    def call(self, block: nn.Module, hidden: torch.Tensor,
             overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`hidden [b, L, H]` (any float dtype) -> the block's output `[b, L, H]` float32 in one call (autograd as
        the caller has it); `overrides` maps parameter names to tensors used instead of the block's own."""
        kwargs = self._call_kwargs(getattr(block, "nano_index", 0), hidden.shape[0], hidden.shape[1])
        hidden = hidden.to(torch.float32)
        out = functional_call(block, overrides, (hidden,), kwargs) if overrides else block(hidden, **kwargs)
        return _block_output(out)

    @torch.no_grad()
    def forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [B, L, H]` -> the block's output `[B, L, H]` in hidden's dtype, in batches (`batch`)."""
        out = torch.empty_like(hidden)
        batch = self.batch(hidden.shape[1])
        for chunk, target in zip(hidden.split(batch), out.split(batch)):
            target.copy_(self.call(block, chunk))
        return out

    def _forward_until(self, block: nn.Module, chunks: list[torch.Tensor], module: str, record, missing: str) -> None:
        """Run each chunk through `block` until `module` (a relative name) is called, handing its call's
        `(args, kwargs)` to `record`; NanoqError '`<block>: <missing>`' when a forward never calls it."""

        def hook(_module, args, kwargs):
            record(args, kwargs)
            raise _Captured

        handle = block.get_submodule(module).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for chunk in chunks:
                try:
                    self.call(block, chunk)
                except _Captured:
                    continue
                raise NanoqError(f"{type(block).__name__}: {missing}")
        finally:
            handle.remove()

    def _group_statistics(self, block: nn.Module, chunks: list[torch.Tensor], linear: str) -> InputStatistics:
        """The statistics of the input of `linear` (a relative name) over every chunk, with the block as it is now:
        the block runs until that linear is called, and each chunk's input is added and dropped (never held)."""
        statistics = None

        def record(args, kwargs):
            nonlocal statistics
            x = args[0]
            if statistics is None:
                statistics = InputStatistics(x.shape[-1], x.device)
            statistics.add(x)

        self._forward_until(block, chunks, linear, record, f"{linear} was not called in a forward pass")
        return statistics

    def _expert_inputs(self, block: nn.Module, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts module's input `[T, H]` and the router's choice `[T, top_k]` over all chunks, with the
        block as it is now (each forward stops at the experts: the router is the model's own)."""
        xs, picks = [], []

        def record(args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            flat = hidden.reshape(-1, hidden.shape[-1])
            xs.append(flat)
            picks.append(index.reshape(flat.shape[0], -1))

        self._forward_until(block, chunks, self.arch.experts.experts, record,
                            "its experts were not called in a forward pass")
        return torch.cat(xs), torch.cat(picks).to(torch.int64)

    @torch.no_grad()
    def walk(self, block: nn.Module, hidden: torch.Tensor, visit: Visit,
             visit_experts: VisitExperts | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run `hidden [B, L, H]` through the block, calling `visit` on each input group of the
        architecture, in the order the block uses them, with the statistics of that group's inputs computed by
        the block with every earlier group already changed (true sequential); returns the block's output
        `[B, L, H]` as changed (in hidden's dtype), written into `out` when given (which may be `hidden` itself:
        each batch's output replaces its input, so that an 8B model's calibration states are not held twice).

        Each group's inputs come from a forward that stops at its first linear, so a block costs about one
        forward per group up to that point (about two and a half forwards for a Llama block). Memory: the block,
        `hidden`, one batch's activations and the statistics, never a group's inputs over every batch.
        """
        batch = self.batch(hidden.shape[1])
        chunks = list(hidden.split(batch))
        for group in self.arch.groups:
            # every later group's inputs, and the output, are computed afresh by the block as visit left it
            visit(group.linears, self._group_statistics(block, chunks, group.linears[0]))
        if self.arch.experts is not None and visit_experts is not None:
            # the experts read what the router reads, after every group before them (attention) is quantized
            visit_experts(*self._expert_inputs(block, chunks))
        if out is None:
            out = torch.empty_like(hidden)
        for chunk, target in zip(chunks, out.split(batch)):
            target.copy_(self.call(block, chunk))
        return out


def _computes_in_float32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear`'s forward on float32 `x [..., K]` with its weight (held in a 16-bit dtype) cast to float32 a few
    output rows at a time (`row_steps`): the block's arithmetic is float32 whatever its weights are held in, and
    no float32 copy of a whole weight is made per call (an 8B gate_proj's is 235 MB)."""
    weight, bias = linear.weight, linear.bias
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for start, end in row_steps(*weight.shape, multiple=64):
        out[..., start:end] = nn.functional.linear(x, weight[start:end].to(x.dtype),
                                                   None if bias is None else bias[start:end])
    return out
