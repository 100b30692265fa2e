"""Run one decoder block of a checkpoint on its own (transformers' own layer class, float32), so that
calibrated quantizers can capture each linear's inputs and feed the next block the quantized outputs."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import NanoqError

_HF_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

# The linears of a pre-norm decoder block grouped by the input they share, in the order the block uses them.
ATTENTION_INPUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTENTION_OUTPUT = ("self_attn.o_proj",)
MLP_INPUT = ("mlp.gate_proj", "mlp.up_proj")
MLP_OUTPUT = ("mlp.down_proj",)
WALK_GROUPS = (ATTENTION_INPUT, ATTENTION_OUTPUT, MLP_INPUT, MLP_OUTPUT)

# visit(group, inputs) sees the input chunks `[b, L, K]` float32 of a group of linears (WALK_GROUPS) before
# the block uses them; it may change the block (quantize the group, fold scales into the group's producer)
# and returns True when the inputs themselves must be recomputed (it changed the producer).
Visit = Callable[[tuple[str, ...], list[torch.Tensor]], bool]


def resolve_device(device: str) -> torch.device:
    """`cpu` or `cuda` as a torch device; NanoqError for anything else or CUDA on a machine without it."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NanoqError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise NanoqError(f"--device {device!r}: choose cpu or cuda")
    return torch.device(device)


class BlockRunner:
    """Builds block `i` from its stored tensors and runs hidden states `[B, L, H]` through it."""

    def __init__(self, config: dict, device: torch.device, batch_size: int = 8) -> None:
        from transformers import AutoConfig

        model_type = config.get("model_type")
        if model_type not in _HF_CLASS_PREFIX:
            raise NanoqError(f"config.json: no calibrated quantization for model_type {model_type!r}")
        fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
        self.config = AutoConfig.for_model(model_type, **fields)
        self.config._attn_implementation = "sdpa"  # causal without a mask (eager would need one)
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        prefix = _HF_CLASS_PREFIX[model_type]
        self.layer_cls = getattr(module, f"{prefix}DecoderLayer")
        self.norm_cls = getattr(module, f"{prefix}RMSNorm")
        self.rotary = getattr(module, f"{prefix}RotaryEmbedding")(config=self.config).to(device)
        self.device = device
        self.batch_size = batch_size
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def build(self, index: int, tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
        """Block `index` in float32 on the device; `tensors` are its stored tensors named `{prefix}.{index}.*`."""
        block = self.layer_cls(self.config, layer_idx=index).to(device=self.device, dtype=torch.float32).eval()
        head = f"{prefix}.{index}."
        state = {name[len(head):]: t.to(torch.float32) for name, t in tensors.items() if name.startswith(head)}
        missing, unexpected = block.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise NanoqError(f"block {index}: tensors do not match {self.layer_cls.__name__} "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return block

    def final_norm(self, weight: torch.Tensor) -> nn.Module:
        """The model's final RMSNorm (transformers' class, float32 on the device) with `weight [H]`."""
        norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = weight.to(device=self.device, dtype=torch.float32)
        return norm.to(self.device).eval()

    def _position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = hidden.shape[1]
        if length not in self._positions:
            ids = torch.arange(length, device=self.device).unsqueeze(0)
            self._positions[length] = self.rotary(hidden[:1], ids)
        return self._positions[length]

    def call(self, block: nn.Module, hidden: torch.Tensor,
             overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`hidden [b, L, H]` float32 -> the block's output `[b, L, H]` in one call (autograd as the caller
        has it); `overrides` maps parameter names to tensors used instead of the block's own."""
        cos, sin = self._position_embeddings(hidden)
        kwargs = {"attention_mask": None, "use_cache": False,
                  "position_embeddings": (cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1))}
        out = functional_call(block, overrides, (hidden,), kwargs) if overrides else block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden [B, L, H]` float32 -> the block's output `[B, L, H]`, in batches of `batch_size`."""
        return torch.cat([self.call(block, chunk) for chunk in hidden.split(self.batch_size)])

    @torch.no_grad()
    def walk(self, block: nn.Module, hidden: torch.Tensor, visit: Visit) -> torch.Tensor:
        """Run `hidden [B, L, H]` float32 through a pre-norm block sublayer by sublayer, calling `visit` on
        each group of WALK_GROUPS before it runs; returns the output `[B, L, H]` of the block as changed.

        Every linear runs on inputs computed with the groups before it already changed (true sequential),
        at about the cost of one forward pass (a hook per group would need one forward per group).
        """
        chunks = list(hidden.split(self.batch_size))

        def attention_inputs():
            return [block.input_layernorm(chunk) for chunk in chunks]

        def attention_outputs(normed):
            """The inputs of o_proj: the attention with o_proj swapped for an identity."""
            o_proj, block.self_attn.o_proj = block.self_attn.o_proj, nn.Identity()
            try:
                mixed = []
                for chunk in normed:
                    cos, sin = self._position_embeddings(chunk)
                    mixed.append(block.self_attn(hidden_states=chunk, attention_mask=None,
                                                 position_embeddings=(cos.expand(chunk.shape[0], -1, -1),
                                                                      sin.expand(chunk.shape[0], -1, -1)))[0])
            finally:
                block.self_attn.o_proj = o_proj
            return mixed

        def visited(group, compute):
            """The inputs of `group` after `visit` saw them (recomputed when it changed their producer)."""
            inputs = compute()
            return compute() if visit(group, inputs) else inputs

        normed = visited(ATTENTION_INPUT, attention_inputs)
        mixed = visited(ATTENTION_OUTPUT, lambda: attention_outputs(normed))
        # free what the closures above read once they have run (None, not del: a closure that runs later
        # sees None and fails loudly instead of a NameError far from here)
        normed = None
        residual = [chunk + block.self_attn.o_proj(m) for chunk, m in zip(chunks, mixed)]
        mixed = chunks = None

        def mlp_inputs():
            return [block.post_attention_layernorm(r) for r in residual]

        def mlp_hidden(normed):
            return [block.mlp.act_fn(block.mlp.gate_proj(n)) * block.mlp.up_proj(n) for n in normed]

        normed = visited(MLP_INPUT, mlp_inputs)
        inner = visited(MLP_OUTPUT, lambda: mlp_hidden(normed))
        normed = None
        return torch.cat([r + block.mlp.down_proj(i) for r, i in zip(residual, inner)])
