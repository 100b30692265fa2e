"""Round-to-nearest: scales from each group's (or channel's) range, then the format's encoder."""

from __future__ import annotations

import torch

from ..format.reference import compress
from ..format.schemes import Scheme, SchemeKind

MIN_SCALE = 1e-8


def rtn_scales(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros) for `weight [N, K]`.

    int_group symmetric: `s = max|w| / ((2**b - 1) / 2)` per group, float32 `[K/G, N]`, zeros None.
    int_group asymmetric: `s = (max - min) / (2**b - 1)` with the range widened to include 0,
    zeros uint8 `[K/G, N]` = round(-min / s). int8: `s = max|w| / 127` float32 `[N]`.
    """
    w = weight.to(torch.float32)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return (w.abs().amax(dim=1) / 127.0).clamp_min(MIN_SCALE), None
    n, k = w.shape
    groups = w.view(n, k // scheme.group_size, scheme.group_size)
    max_code = (1 << scheme.bits) - 1
    if scheme.symmetric:
        scales = groups.abs().amax(dim=2) / (max_code / 2)
        return scales.clamp_min(MIN_SCALE).t().contiguous(), None
    low = groups.amin(dim=2).clamp_max(0)
    high = groups.amax(dim=2).clamp_min(0)
    scales = ((high - low) / max_code).clamp_min(MIN_SCALE)
    scales = scales.to(torch.float16).to(torch.float32)  # zeros are rounded against the stored scale
    zeros = torch.clamp(torch.round(-low / scales), 0, max_code)
    return scales.t().contiguous(), zeros.t().to(torch.uint8).contiguous()


def quantize_rtn(weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """RTN-quantize `weight [N, K]` into the stored tensors of `scheme` (see format.layout)."""
    scales, zeros = rtn_scales(weight, scheme)
    return compress(weight, scheme, scales, zeros)
