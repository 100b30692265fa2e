"""Round to nearest, from the weights alone: the format's own data-free quantizer of each scheme (min-max
integer grids, the nearest level of a fitted codebook), and NVFP4 with one global scale per group, so that
the parts of a fused q/k/v or gate/up share one (engines and compressed-tensors keep one per fused layer)."""

from __future__ import annotations

from ...format.schemes import SchemeKind
from .base import GroupResult, LinearGroup, QuantMethod
from .registry import register_method


@register_method
class Rtn(QuantMethod):
    name = "rtn"
    needs_calibration = False

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        from ..data_free import quantize_data_free
        from ..nvfp4 import global_scale_for, quantize_nvfp4

        nvfp4 = [m for m, entry in group.planned.items() if entry.scheme.kind is SchemeKind.NVFP4]
        global_scale = None
        if nvfp4:
            amax = max(group.weights[m].abs().max().item() for m in nvfp4)
            global_scale = global_scale_for(amax, group.nvfp4_alpha)
        stored = {}
        for module, entry in group.planned.items():
            weight = group.weights[module]
            if entry.scheme.kind is SchemeKind.NVFP4:
                stored[module] = quantize_nvfp4(weight, entry.scheme, global_scale, group.nvfp4_alpha)
            else:
                stored[module] = quantize_data_free(weight, entry.scheme)
        return GroupResult(stored)
