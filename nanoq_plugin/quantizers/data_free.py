"""The quantizer of a scheme that needs no calibration data: what `nanoq quantize --method rtn` and the
benchmarks apply to one weight."""

from __future__ import annotations

import torch

from ..format.schemes import Scheme, SchemeKind
from .codebook import quantize_codebook
from .nvfp4 import quantize_nvfp4
from .rtn import quantize_rtn


def quantize_data_free(weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Stored tensors (format.layout names) of `weight [N, K]` float32: the nearest level for codebooks, NVFP4
    with the tensor's own global scale, round-to-nearest for integer schemes."""
    if scheme.kind is SchemeKind.CODEBOOK:
        return quantize_codebook(weight, scheme)
    if scheme.kind is SchemeKind.NVFP4:
        return quantize_nvfp4(weight, scheme)
    return quantize_rtn(weight, scheme)
