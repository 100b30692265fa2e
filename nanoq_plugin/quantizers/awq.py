"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, searched per group of linears that
share an input and folded into the op that produces that input, so the checkpoint format is unchanged.

For linears `W_i [N_i, K]` sharing inputs `x [T, K]`, a scale `s [K]` turns `W x` into `(W diag(s)) (x / s)`:
exact in float, but salient input channels (large `|x|`) get finer quantization steps. The scale is
`s = mean|x|^r / mean_w^(1-r)` (AutoAWQ's "duo" scaling, normalized to a geometric mean of 1) for the ratio
`r` of a grid that minimizes the group's output error. The output error of a weight error `ΔW` over all
calibration tokens is `tr(ΔW H ΔWᵀ)` with `H = Σ xᵀx` (the GPTQ Hessian), so the search scores every
candidate on the whole calibration set without running the inputs through the linears again.
"""

from __future__ import annotations

import torch

from ..format.schemes import Scheme, SchemeKind
from .rtn import fake_quantize_rtn

RATIO_GRID = 20
MIN_SCALE = 1e-4


def weight_magnitude(weights: list[torch.Tensor], schemes: list[Scheme]) -> torch.Tensor:
    """Mean over output rows of `|W|` normalized by its quantization group's max, float32 `[K]`."""
    rows = []
    for weight, scheme in zip(weights, schemes):
        n, k = weight.shape
        group = scheme.group_size if scheme.kind is SchemeKind.INT_GROUP else k
        grouped = weight.to(torch.float32).abs().view(n, k // group, group)
        rows.append((grouped / grouped.amax(dim=2, keepdim=True).clamp_min(1e-12)).view(n, k))
    return torch.cat(rows).mean(dim=0)


def output_error(weight: torch.Tensor, restored: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr(ΔW H ΔWᵀ)` for `ΔW = weight - restored` (`[N, K]`) and `hessian [K, K]`: the summed squared output
    error over the tokens `hessian` was accumulated from (up to its normalization)."""
    delta = weight.to(torch.float32) - restored.to(torch.float32)
    return torch.sum((delta @ hessian) * delta).item()


def search_scales(
    weights: list[torch.Tensor], schemes: list[Scheme], hessian: torch.Tensor, input_abs_mean: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """The AWQ scale `[K]` float32 for linears `weights[i] [N_i, K]` quantized with `schemes[i]` (RTN in the
    search), and the chosen ratio; `input_abs_mean [K]` is mean |x| per input channel. Ratio 0 with
    the weight term off is the identity, so the result is never worse than no scaling on this data."""
    magnitude = weight_magnitude(weights, schemes)
    best_error, best_scale, best_ratio = float("inf"), torch.ones_like(input_abs_mean), 0.0
    candidates = [(None, torch.ones_like(input_abs_mean))]
    for step in range(RATIO_GRID):
        ratio = step / RATIO_GRID
        scale = (input_abs_mean.pow(ratio) / magnitude.pow(1 - ratio)).clamp_min(MIN_SCALE)
        candidates.append((ratio, scale / torch.sqrt(scale.max() * scale.min())))
    for ratio, scale in candidates:
        error = 0.0
        for weight, scheme in zip(weights, schemes):
            scaled = weight.to(torch.float32) * scale
            restored = fake_quantize_rtn(scaled, scheme) / scale
            error += output_error(weight, restored, hessian)
        if error < best_error:
            best_error, best_scale, best_ratio = error, scale, (-1.0 if ratio is None else ratio)
    return best_scale, best_ratio
