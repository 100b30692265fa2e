"""AWQ (quantizers.awq): per-input-channel scales searched for the group from its inputs, folded into the op
that produces them; the scaled weights are then rounded to nearest (`awq`) or by GPTQ (`awq-gptq`).

Only groups with a producer and integer schemes are scaled: codebook schemes rotate instead, and a group
whose search keeps the identity is quantized as it is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ...format.schemes import Scheme, SchemeKind
from ..settings import GptqSettings
from .base import GroupResult, LinearGroup, QuantMethod
from .registry import register_method
from .rounding import quantize_nearest, quantize_with_hessian

if TYPE_CHECKING:
    import torch

# GPTQ's own dampening after AWQ scaled a Hessian that was damped before scaling (numerical safety only)
PREDAMPED = 1e-6
SCALED_KINDS = (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL)


@register_method
class Awq(QuantMethod):
    name = "awq"
    folds_scales = True
    kinds = (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL, SchemeKind.CODEBOOK)

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        weights = {module: group.weights[module] for module in group.planned}
        schemes = [entry.scheme for entry in group.planned.values()]
        hessian, settings, scale, notes = group.hessian, group.gptq, None, {}
        if group.producer is not None and all(s.kind in SCALED_KINDS for s in schemes):
            from ..awq import search_scales

            found, ratio = search_scales(list(weights.values()), schemes, hessian, group.input_abs_mean)
            notes = {"awq_ratios": {group.producer: ratio}}
            if ratio >= 0:  # not the identity
                scale = found
                weights = {module: weight * scale for module, weight in weights.items()}
                hessian, settings = self.scaled_hessian(hessian, scale, settings)
        stored = {module: self.round(weights[module], hessian, entry.scheme, settings, module)
                  for module, entry in group.planned.items()}
        return GroupResult(stored, references=weights, input_scale=scale, notes=notes)

    def scaled_hessian(self, hessian: torch.Tensor, scale: torch.Tensor,
                       settings: GptqSettings) -> tuple[torch.Tensor, GptqSettings]:
        """The Hessian `[K, K]` of the inputs divided by `scale [K]`, and the settings to round with."""
        return hessian / scale.unsqueeze(1) / scale.unsqueeze(0), settings

    def round(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, settings: GptqSettings,
              where: str) -> dict[str, torch.Tensor]:
        """Stored tensors of the (scaled) `weight [N, K]`."""
        return quantize_nearest(weight, scheme)


@register_method
class AwqGptq(Awq):
    name = "awq-gptq"

    def scaled_hessian(self, hessian: torch.Tensor, scale: torch.Tensor,
                       settings: GptqSettings) -> tuple[torch.Tensor, GptqSettings]:
        import torch

        damped = hessian.clone()  # damp in the unscaled input space, where damp · mean(diag H) means what it says
        damped.diagonal().add_(settings.damp * torch.mean(torch.diag(damped)))
        return super().scaled_hessian(damped, scale, replace(settings, damp=PREDAMPED))

    def round(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, settings: GptqSettings,
              where: str) -> dict[str, torch.Tensor]:
        return quantize_with_hessian(weight, hessian, scheme, settings, where)
