"""How the calibrated methods put one linear on its scheme's grid: the only place they tell schemes apart.

Integer schemes: round to nearest on the clip-searched grid (quantizers.rtn), or GPTQ on it (quantizers.gptq).
Codebook schemes: fit the codebook (rotation + Lloyd-Max levels, quantizers.codebook), then take the nearest
level, or run GPTQ in the rotated space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...format.schemes import Scheme, SchemeKind
from ..settings import GptqSettings

if TYPE_CHECKING:
    import torch


def quantize_nearest(weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Stored tensors of `weight [N, K]` float32 rounded to nearest: the clip-searched integer grid, or the
    nearest level of the fitted codebook."""
    if scheme.kind is SchemeKind.CODEBOOK:
        from ..codebook import quantize_codebook

        return quantize_codebook(weight, scheme)
    from ..rtn import quantize_rtn

    return quantize_rtn(weight, scheme, clip_search=True)


def quantize_with_hessian(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, settings: GptqSettings,
                          where: str) -> dict[str, torch.Tensor]:
    """Stored tensors of `weight [N, K]` float32 by GPTQ with the input Hessian `hessian [K, K]` (a codebook
    scheme's in its rotated space); `where` names the linear in errors."""
    if scheme.kind is SchemeKind.CODEBOOK:
        from ..codebook import quantize_codebook

        return quantize_codebook(weight, scheme, hessian, settings, where)
    from ..gptq import gptq_quantize

    return gptq_quantize(weight, hessian, scheme, settings, where=where)
