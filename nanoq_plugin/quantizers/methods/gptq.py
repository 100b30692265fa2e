"""GPTQ (quantizers.gptq): every linear of the group column by column, each column's rounding error fed back
into the columns not yet quantized through the inverse Hessian of the group's inputs."""

from __future__ import annotations

from ...format.schemes import SchemeKind
from .base import GroupResult, LinearGroup, QuantMethod
from .registry import register_method
from .rounding import quantize_with_hessian


@register_method
class Gptq(QuantMethod):
    name = "gptq"
    kinds = (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL, SchemeKind.CODEBOOK)

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        hessian = group.hessian
        return GroupResult({module: quantize_with_hessian(group.weights[module], hessian, entry.scheme, group.gptq,
                                                          module)
                            for module, entry in group.planned.items()})
