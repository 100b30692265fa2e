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
        settings = group.gptq
        stored = {module: quantize_with_hessian(group.weights[module], group.hessian, entry.scheme, settings, module)
                  for module, entry in group.planned.items() if entry.scheme.kind is SchemeKind.CODEBOOK}
        integer = [module for module in group.planned if module not in stored]
        if integer:
            from ..gptq import gptq_quantize, prepare_hessian

            # one factorisation for the group (its linears share the inputs), made from the group's own Hessian,
            # which no one reads after it: two [K, K] tensors at a time, not three
            prepared = prepare_hessian(group.release_hessian(), settings, integer[0], in_place=True)
            for module in integer:
                stored[module] = gptq_quantize(group.weights[module], prepared, group.planned[module].scheme,
                                               settings, module)
        return GroupResult({module: stored[module] for module in group.planned})
