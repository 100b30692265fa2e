"""Block-output tuning after GPTQ: with every code fixed, fit the continuous parameters of a quantized block
(group scales, codebook levels, the block's norm weights) so that its output matches the float model.

GPTQ minimizes each linear's own output error, one linear at a time, on inputs that already carry the error
of the blocks before it. This step looks at the whole block at once and at the float model's own signal:

- inputs  `[B, L, H]`: the hidden states of the quantized model so far (what the block will see);
- targets `[B, L, H]`: the float block's outputs on the float model's hidden states,

so the block learns to undo part of the error it receives as well as its own (the float-stream target of
GPTAQ / EfficientQAT's block-wise stage). Trained with Adam on *relative* changes (`p = p0 · (1 + δ)`, δ
starting at 0, a cosine-decayed rate), so one rate suits scales of any magnitude; a block whose error on
held-out windows does not drop keeps its GPTQ parameters.

Tunable per scheme: int_group / int8 scales (float16 when stored), codebook scales and levels; NVFP4 and
float linears stay as they are (an FP8 scale cannot carry a small change).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..format.hadamard import unrotate_weight
from ..format.layout import SCALE_DTYPE
from ..format.packing import unpack_codes
from ..format.reference import dequantize
from ..format.schemes import Scheme, SchemeKind
from .settings import HELD_OUT, TuneSettings

# call(block, x [b, L, H], overrides) -> the block's output [b, L, H] with the parameters in `overrides`
# (BlockRunner.call)
BlockCall = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
TUNABLE_KINDS = (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL, SchemeKind.CODEBOOK)
class _LevelLookup(torch.autograd.Function):
    """`levels[codes]` whose backward sums the gradient per level with one bincount (autograd's index_put
    with accumulation is ~10x slower on the CPU for a table of a few entries and millions of codes)."""

    @staticmethod
    def forward(ctx, levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)  # uint8: a quarter of the float weight's memory
        ctx.num_levels = levels.numel()
        return levels[codes.long()]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        summed = torch.bincount(codes.reshape(-1).long(), weights=grad.reshape(-1).to(torch.float64),
                                minlength=ctx.num_levels)
        return summed.to(grad.dtype), None


class TunableLinear:
    """The stored tensors of one quantized linear with its scales (and codebook levels) made trainable.

    `weight()` is the dequantized `[N, K]` float32 weight as a differentiable function of the deltas;
    `stored()` returns the stored tensors with the tuned values (codes unchanged).
    """

    def __init__(self, stored: dict[str, torch.Tensor], scheme: Scheme, out_features: int, in_features: int,
                 device: torch.device) -> None:
        self.stored_tensors, self.scheme = stored, scheme
        self.scales = stored["scales"].to(device=device, dtype=torch.float32)
        self.scale_delta = torch.zeros_like(self.scales, requires_grad=True)
        self.deltas = [self.scale_delta]
        if scheme.kind is SchemeKind.CODEBOOK:
            self.codes = unpack_codes(stored["qweight"], scheme.bits).to(device).t().contiguous()  # [N, K] uint8
            self.levels = stored["codebook"].to(device=device, dtype=torch.float32)
            self.level_delta = torch.zeros_like(self.levels, requires_grad=True)
            self.signs = stored["signs"].to(device)
            self.deltas.append(self.level_delta)
        else:  # the weight is linear in the scales: the codes minus zeros, integers in [-255, 255]
            unit = {**stored, "scales": torch.ones_like(stored["scales"])}
            self.unit_weight = dequantize(unit, scheme, out_features, in_features).to(device, torch.int16)  # [N, K]

    def _tuned_scales(self) -> torch.Tensor:
        return self.scales * (1 + self.scale_delta)

    def _tuned_levels(self) -> torch.Tensor:
        return self.levels * (1 + self.level_delta)

    def weight(self) -> torch.Tensor:
        """`[N, K]` float32, differentiable in the deltas."""
        scales = self._tuned_scales()
        if self.scheme.kind is SchemeKind.INT8_CHANNEL:
            return self.unit_weight.to(torch.float32) * scales.unsqueeze(1)
        per_column = scales.repeat_interleave(self.scheme.group_size, dim=0).t()  # [N, K]
        if self.scheme.kind is SchemeKind.CODEBOOK:
            levels = _LevelLookup.apply(self._tuned_levels(), self.codes)
            return unrotate_weight(levels * per_column, self.signs, self.scheme.group_size)
        return self.unit_weight.to(torch.float32) * per_column

    @torch.no_grad()
    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors with the tuned scales (float16) and levels; codes, zeros and signs unchanged."""
        device = self.stored_tensors["scales"].device
        tuned = {**self.stored_tensors, "scales": self._tuned_scales().to(SCALE_DTYPE).to(device)}
        if self.scheme.kind is SchemeKind.CODEBOOK:
            tuned["codebook"] = self._tuned_levels().to(device)
        return tuned


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The optimizer's rate decayed from its initial value to zero over `steps` (half a cosine); step it after
    every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))


def norm_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> weight `[H]` of every RMSNorm of the block (input, post-attention, Qwen3's q/k norms)."""
    return {f"{name}.weight": module.weight for name, module in block.named_modules()
            if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None}


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def tune_block(block: nn.Module, call: BlockCall, tunables: dict[str, TunableLinear], inputs: torch.Tensor,
               targets: torch.Tensor, settings: TuneSettings) -> dict:
    """Fit the deltas of `tunables` (module name -> TunableLinear) and the block's norm weights so that
    `call(block, x, overrides)` on `inputs [B, L, H]` matches `targets [B, L, H]`; on success the tuned
    norm weights are written into the block. Returns the record: relative squared error on the held-out
    windows before and after, and whether the tuned values were kept (the caller reads `stored()`).
    """
    norms = {name: weight.detach().clone() for name, weight in norm_weights(block).items()}
    norm_deltas = {name: torch.zeros_like(weight, requires_grad=True) for name, weight in norms.items()}
    deltas = [d for t in tunables.values() for d in t.deltas] + list(norm_deltas.values())
    for parameter in block.parameters():
        parameter.requires_grad_(False)

    def overrides() -> dict[str, torch.Tensor]:
        tuned = {f"{name}.weight": t.weight() for name, t in tunables.items()}
        tuned.update({name: norms[name] * (1 + delta) for name, delta in norm_deltas.items()})
        return tuned

    held_out = min(HELD_OUT, max(1, inputs.shape[0] // 4))
    train_x, train_y = inputs[held_out:], targets[held_out:]
    if train_x.shape[0] == 0:
        train_x, train_y = inputs, targets

    def held_out_error() -> float:
        with torch.no_grad():
            tuned = overrides()
            return sum(_relative_error(call(block, inputs[i:i + 1], tuned), targets[i:i + 1]).item()
                       for i in range(held_out)) / held_out

    before = held_out_error()
    optimizer = torch.optim.Adam(deltas, lr=settings.lr)
    schedule = cosine_schedule(optimizer, settings.steps)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(train_x.shape[0], generator=generator)
    cursor = 0
    for _ in range(settings.steps):
        if cursor + settings.batch > order.numel():
            order, cursor = torch.randperm(train_x.shape[0], generator=generator), 0
        picked = order[cursor:cursor + settings.batch]
        cursor += settings.batch
        loss = _relative_error(call(block, train_x[picked], overrides()), train_y[picked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    after = held_out_error()
    kept = after < before
    if kept:
        with torch.no_grad():
            for name, delta in norm_deltas.items():
                block.get_parameter(name).data = norms[name] * (1 + delta)
    else:
        with torch.no_grad():
            for delta in deltas:
                delta.zero_()
    return {"held_out_error_before": float(f"{before:.6g}"), "held_out_error_after": float(f"{after:.6g}"),
            "held_out_windows": held_out, "kept": kept}
