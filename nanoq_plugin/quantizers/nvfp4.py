"""NVFP4 round-to-nearest with the scale-inflation option `alpha`, and the entropy proxy of packed bytes.

Scales follow compressed-tensors / ModelOpt: a global scale `g = 448 · 6 / (alpha · amax)` (amax over the
tensor, or over all parts of a fused q/k/v or gate/up so that they share one `g`), and per block of 16
inputs the FP8 scale `s = alpha · amax_block / 6 · g`; the values `w · g / s` are rounded to E2M1.

`alpha > 1` inflates every block scale (and deflates `g` so the largest block still fits FP8): values then
use the small E2M1 magnitudes more often. The rounding is coarser, but the packed bytes carry less
information (`packed_entropy_bits`, Shannon entropy of the bytes), which is what a lossless compressor
of the checkpoint (zstd, the transport of a serving system) can exploit.
"""

from __future__ import annotations

import math

import torch

from ..format.fp4 import FP4_MAX, FP8_E4M3_MAX
from ..format.reference import compress
from ..format.schemes import Scheme


def global_scale_for(amax: float, alpha: float = 1.0) -> torch.Tensor:
    """The float32 `[1]` global scale for a tensor (or fused group) whose largest magnitude is `amax`."""
    if amax <= 0 or not math.isfinite(amax):
        return torch.ones(1)
    return torch.tensor([FP8_E4M3_MAX * FP4_MAX / (alpha * amax)], dtype=torch.float32)


def quantize_nvfp4(weight: torch.Tensor, scheme: Scheme, global_scale: torch.Tensor | None = None,
                   alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """NVFP4-quantize `weight [N, K]` (K a multiple of 16) into `qweight`, `scales`, `global_scale`.

    `global_scale [1]` float32 defaults to the tensor's own (`global_scale_for`); pass the fused group's.
    """
    w_t = weight.t().to(torch.float32)
    if global_scale is None:
        global_scale = global_scale_for(w_t.abs().max().item(), alpha)
    k, n = w_t.shape
    block_amax = w_t.view(k // scheme.group_size, scheme.group_size, n).abs().amax(dim=1)
    scales = (alpha * block_amax / FP4_MAX * global_scale).clamp(max=FP8_E4M3_MAX)
    return compress(weight, scheme, scales, global_scale)


def packed_entropy_bits(packed: torch.Tensor) -> float:
    """Shannon entropy (bits per byte, at most 8) of the bytes of a packed tensor."""
    counts = torch.bincount(packed.reshape(-1).to(torch.int64) & 0xFF, minlength=256).to(torch.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * probabilities.log2()).sum())
