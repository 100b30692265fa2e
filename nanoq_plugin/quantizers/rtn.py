"""Round-to-nearest: scales from each group's (or channel's) range, then the format's encoder.

`rtn_scales(..., clip_search=True)` shrinks each group's range to the factor that minimizes the group's
rounding error `Σ |w - Q(w)|^2.4` (the MSE clipping of GPTQModel / AWQ's clip search, without data):
a few outliers then no longer stretch the grid of the whole group.
"""

from __future__ import annotations

import torch

from ..format.layout import SCALE_DTYPE
from ..format.reference import compress, symmetric_zero
from ..format.schemes import Scheme, SchemeKind
from ..format.tensor_spec import row_steps

MIN_SCALE = 2.0**-24  # the smallest positive float16: a scale never rounds to 0 when stored
CLIP_GRID = torch.linspace(1.0, 0.55, 16).tolist()  # range shrink factors tried by the clip search
CLIP_NORM = 2.4


def _grouped(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`[N, K]` -> `[N, K/G, G]` (int8 per channel: `[N, 1, K]`)."""
    n, k = weight.shape
    group = k if scheme.kind is SchemeKind.INT8_CHANNEL else scheme.group_size
    return weight.to(torch.float32).view(n, k // group, group)


def _stored(scales: torch.Tensor) -> torch.Tensor:
    """Scales as the format stores them (float16, at least MIN_SCALE), back in float32."""
    return scales.to(SCALE_DTYPE).to(torch.float32).clamp_min(MIN_SCALE)


def _range_params(low: torch.Tensor, high: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (stored precision, float32) and zero point (float32, None when symmetric) of each group's range."""
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return _stored(torch.maximum(-low, high) / 127.0), None
    max_code = (1 << scheme.bits) - 1
    if scheme.symmetric:
        return _stored(torch.maximum(-low, high) / (max_code / 2)), None
    scales = _stored((high - low) / max_code)
    return scales, torch.clamp(torch.round(-low / scales), 0, max_code)


def _restored_groups(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     scheme: Scheme) -> torch.Tensor:
    """Groups `[N, K/G, G]` rounded on the grid of params `[N, K/G]` and restored (float32)."""
    s = scales.unsqueeze(-1)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return torch.clamp(torch.round(groups / s), -127, 127) * s
    z = (zeros if zeros is not None else torch.full_like(scales, symmetric_zero(scheme.bits))).unsqueeze(-1)
    return (torch.clamp(torch.round(groups / s) + z, 0, (1 << scheme.bits) - 1) - z) * s


def _group_error(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """`Σ |w - Q(w)|^CLIP_NORM` per group `[N, K/G]` for groups `[N, K/G, G]` and params `[N, K/G]`."""
    return (_restored_groups(groups, scales, zeros, scheme) - groups).abs_().pow_(CLIP_NORM).sum(-1)


def fake_quantize_rtn(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`weight [N, K]` rounded to nearest on its min-max grid and restored, float32 `[N, K]`: what
    `dequantize(quantize_rtn(weight, scheme))` gives, without packing (for searches that try many weights)."""
    groups = _grouped(weight, scheme)
    scales, zeros = _range_params(groups.amin(dim=2).clamp_max(0), groups.amax(dim=2).clamp_min(0), scheme)
    return _restored_groups(groups, scales, zeros, scheme).view(weight.shape)


def rtn_scales(weight: torch.Tensor, scheme: Scheme, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros) for `weight [N, K]`, some rows at a time (`row_steps`: the clip search's temporaries
    are a few copies of the rows it works on).

    int_group symmetric: `s = max|w| / ((2**b - 1) / 2)` per group, float32 `[K/G, N]`, zeros None.
    int_group asymmetric: `s = (max - min) / (2**b - 1)` with the range widened to include 0,
    zeros uint8 `[K/G, N]` = round(-min / s). int8: `s = max|w| / 127` float32 `[N]`.
    With `clip_search` each group's range is first multiplied by the factor of CLIP_GRID with the least error.
    """
    n, k = weight.shape
    steps = [_row_scales(weight[start:end], scheme, clip_search) for start, end in row_steps(n, k)]
    scales = torch.cat([step_scales for step_scales, _ in steps])
    zeros = None if steps[0][1] is None else torch.cat([step_zeros for _, step_zeros in steps])
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return scales.view(-1), None
    return scales.t().contiguous(), None if zeros is None else zeros.t().to(torch.uint8).contiguous()


def _row_scales(weight: torch.Tensor, scheme: Scheme, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`rtn_scales` of rows `weight [n, K]`: scales and zeros (None when symmetric) float32 `[n, K/G]`."""
    groups = _grouped(weight, scheme)
    low, high = groups.amin(dim=2).clamp_max(0), groups.amax(dim=2).clamp_min(0)
    scales, zeros = _range_params(low, high, scheme)
    if clip_search:
        best = _group_error(groups, scales, zeros, scheme)
        for factor in CLIP_GRID[1:]:
            candidate_scales, candidate_zeros = _range_params(low * factor, high * factor, scheme)
            error = _group_error(groups, candidate_scales, candidate_zeros, scheme)
            better = error < best
            best = torch.where(better, error, best)
            scales = torch.where(better, candidate_scales, scales)
            if zeros is not None:
                zeros = torch.where(better, candidate_zeros, zeros)
    return scales, zeros


def quantize_rtn(weight: torch.Tensor, scheme: Scheme, clip_search: bool = False) -> dict[str, torch.Tensor]:
    """RTN-quantize `weight [N, K]` into the stored tensors of `scheme` (see format.layout)."""
    scales, zeros = rtn_scales(weight, scheme, clip_search)
    return compress(weight, scheme, scales, zeros)
