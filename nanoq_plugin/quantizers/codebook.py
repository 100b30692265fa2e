"""Codebook quantization (TurboQuant-style, arXiv:2504.19874, adapted to weights), with GPTQ error feedback.

1. Rotate each group of G input channels with a seeded randomized Hadamard transform (format.hadamard):
   the rotated coordinates of a row are close to Gaussian whatever outliers the row had.
2. Scale each group `[n, g]` by its RMS, and fit one Lloyd-Max codebook of 2**b levels (1-D k-means,
   started from the Gaussian optimum) to all normalized coordinates of the module.
3. Per group, the least-squares scale for the chosen levels (alternated with the assignment twice).
4. Without calibration: each coordinate takes its nearest level. With a Hessian: GPTQ in the rotated space
   (`R H Rᵀ`), each column rounded to its nearest level times its group's fixed scale — the error feedback
   that QuIP# / QTIP show is what makes 2-bit usable.

Stored: codes packed like int_group, float16 scales, the float32 codebook, the int8 signs (format.reference).
"""

from __future__ import annotations

import functools

import torch

from ..format.hadamard import random_signs, rotate_hessian, rotate_weight, unrotate_weight
from ..format.layout import SCALE_DTYPE
from ..format.packing import pack_codes
from ..format.schemes import Scheme
from .gptq import gptq_solve
from .settings import GptqSettings

ROTATION_SEED = 0
LLOYD_ITERATIONS = 30
LLOYD_SAMPLES = 1 << 18  # normalized coordinates the codebook is fitted on (a seeded subsample beyond this)
SCALE_REFITS = 2


@functools.lru_cache(maxsize=None)
def gaussian_levels(bits: int) -> torch.Tensor:
    """Lloyd-Max levels `[2**bits]` float32 for the standard normal (fitted on its quantiles)."""
    count = 1 << 16
    samples = torch.special.ndtri((torch.arange(count, dtype=torch.float64) + 0.5) / count).to(torch.float32)
    start = torch.special.ndtri((torch.arange(1 << bits, dtype=torch.float64) + 0.5) / (1 << bits)).to(torch.float32)
    return lloyd_max(samples, start, iterations=100)


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int64, values' shape) of the nearest of the sorted `levels` for each value."""
    return torch.bucketize(values.contiguous(), (levels[1:] + levels[:-1]) / 2)


def lloyd_max(values: torch.Tensor, levels: torch.Tensor, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """1-D k-means of `values` (flat float32) from the sorted start `levels`; returns sorted float32 levels."""
    levels = levels.to(torch.float32).clone()
    for _ in range(iterations):
        index = nearest_level(values, levels)
        counts = torch.bincount(index, minlength=levels.numel()).to(torch.float32)
        sums = torch.zeros_like(levels).scatter_add_(0, index, values)
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels).sort().values
    return levels


def fit_codebook(rotated: torch.Tensor, scheme: Scheme,
                 iterations: int = LLOYD_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales `[K/G, N]` float32 (float16-representable) and levels `[2**b]` float32 for the rotated weight
    `rotated [N, K]` (`iterations` of Lloyd's algorithm from the Gaussian levels)."""
    n, k = rotated.shape
    groups = rotated.to(torch.float32).view(n, k // scheme.group_size, scheme.group_size)
    rms = groups.pow(2).mean(dim=2).sqrt().clamp_min(1e-8)
    normalized = (groups / rms.unsqueeze(-1)).reshape(-1)
    if normalized.numel() > LLOYD_SAMPLES:
        generator = torch.Generator().manual_seed(ROTATION_SEED)
        sample = torch.randperm(normalized.numel(), generator=generator)[:LLOYD_SAMPLES]
        normalized = normalized[sample.to(normalized.device)]
    levels = lloyd_max(normalized, gaussian_levels(scheme.bits).to(normalized.device), iterations)
    scales = rms
    for _ in range(SCALE_REFITS):  # least-squares scale for the levels each coordinate takes
        chosen = levels[nearest_level(groups / scales.unsqueeze(-1), levels)]
        fitted = (groups * chosen).sum(dim=2) / chosen.pow(2).sum(dim=2).clamp_min(1e-12)
        scales = torch.where(fitted > 0, fitted, scales)
    scales = scales.to(SCALE_DTYPE).to(torch.float32).clamp_min(2.0**-24)
    return scales.t().contiguous(), levels


def restore_nearest(rotated: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor, group_size: int) -> torch.Tensor:
    """Every coordinate of `rotated [N, K]` replaced by its nearest level times its group scale (`[K/G, N]`)."""
    per_column = scales.repeat_interleave(group_size, dim=0).t()  # [N, K]
    return levels[nearest_level(rotated / per_column, levels)] * per_column


def compress_codebook(rotated: torch.Tensor, scheme: Scheme, scales: torch.Tensor, levels: torch.Tensor,
                      signs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stored tensors of a rotated weight `[N, K]` on the grid (`scales [K/G, N]`, `levels [2**b]`)."""
    per_row = scales.repeat_interleave(scheme.group_size, dim=0)  # [K, N]
    codes = nearest_level(rotated.t().to(torch.float32) / per_row, levels).to(torch.uint8)
    return {"qweight": pack_codes(codes, scheme.bits), "scales": scales.to(SCALE_DTYPE).contiguous(),
            "codebook": levels.to(torch.float32).contiguous(), "signs": signs.to(torch.int8).contiguous()}


def fake_quantize_codebook(weight: torch.Tensor, scheme: Scheme, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """`weight [N, K]` after nearest-level rounding in `scheme`, back in the original space (float32), without
    packing; `iterations` of Lloyd's algorithm fit the levels (fewer for a cheap estimate)."""
    signs = random_signs(weight.shape[1], ROTATION_SEED).to(weight.device)
    rotated = rotate_weight(weight, signs, scheme.group_size)
    scales, levels = fit_codebook(rotated, scheme, iterations)
    restored = restore_nearest(rotated, scales.to(weight.device), levels.to(weight.device), scheme.group_size)
    return unrotate_weight(restored, signs, scheme.group_size)


def quantize_codebook(weight: torch.Tensor, scheme: Scheme, hessian: torch.Tensor | None = None,
                      settings: GptqSettings = GptqSettings(), where: str = "linear") -> dict[str, torch.Tensor]:
    """Codebook-quantize `weight [N, K]` into its stored tensors; with the input `hessian [K, K]`, by GPTQ in the
    rotated space, otherwise by nearest level."""
    k = weight.shape[1]
    signs = random_signs(k, ROTATION_SEED).to(weight.device)
    rotated = rotate_weight(weight, signs, scheme.group_size)
    scales, levels = fit_codebook(rotated, scheme)
    levels = levels.to(weight.device)
    scales = scales.to(weight.device)
    if hessian is not None:
        column_scales = scales.repeat_interleave(scheme.group_size, dim=0)  # [K, N]

        def fake_quantize(column: torch.Tensor, index: int) -> torch.Tensor:
            step = column_scales[index]
            return levels[nearest_level(column / step, levels)] * step

        rotated = gptq_solve(rotated, rotate_hessian(hessian, signs, scheme.group_size), fake_quantize, settings, where)
    return compress_codebook(rotated, scheme, scales, levels, signs)
