"""The quantizer of a scheme that needs no calibration data: what `nanoq quantize --method rtn` and the
benchmarks apply to one weight."""

from __future__ import annotations

import torch

from ..format.schemes import Scheme, SchemeKind
from .codebook import quantize_codebook
from .nvfp4 import quantize_nvfp4
from .rtn import quantize_rtn

# The built-in kinds' data-free quantizers; any other registered kind brings its own (`SchemeKind.quantize`).
DATA_FREE_QUANTIZERS = {SchemeKind.INT_GROUP: quantize_rtn, SchemeKind.INT8_CHANNEL: quantize_rtn,
                        SchemeKind.NVFP4: quantize_nvfp4, SchemeKind.CODEBOOK: quantize_codebook}


def quantize_data_free(weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Stored tensors (format.layout names) of `weight [N, K]` (any float dtype: the built-in quantizers compute
    in float32): the nearest level for codebooks, NVFP4 with the tensor's own global scale, round-to-nearest for
    integer schemes, the kind's own quantizer else (given float32)."""
    quantizer = DATA_FREE_QUANTIZERS.get(scheme.kind)
    if quantizer is None:
        return scheme.kind.quantize(weight.to(torch.float32), scheme)
    return quantizer(weight, scheme)
