"""What a quantization method is to the pipeline: one interface, called per group of linears.

A method is one `QuantMethod` registered by name (`methods.registry`). The pipeline's block walk hands it each
group of linears of a decoder block that share one input (q/k/v, o, gate/up, down) with the inputs captured
while the block runs on calibration text, and stores what it returns. A method that needs no calibration
(`needs_calibration = False`) gets the same kind of group without inputs, straight from the stored weights
(one group per fused q/k/v or gate/up, every other linear alone).

Built-in method modules import their algorithms inside `quantize_group`, so that the registry (which the
command line's parser reads for `--method`) stays free of torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ...format.schemes import Scheme, SchemeKind
from ..settings import GptqSettings

if TYPE_CHECKING:
    import torch

    from ..input_statistics import InputStatistics
    from ..recipe import PlannedModule


@dataclass
class LinearGroup:
    """Linears of one decoder block that share an input, as the pipeline hands them to a method.

    `modules`: full module names (`model.layers.3.mlp.gate_proj`) in the order the block uses them.
    `planned`: those to quantize, with their schemes (the others stay float).
    `weights`: every module's weight `[N, K]` on the device as the block holds it now: float32, or the 16-bit
    dtype it is stored in where the walk holds linears as stored (a method computes in float32); read-only (a
    method returns new tensors).
    `statistics`: the statistics of the group's calibration inputs (their Hessian and mean magnitude per input
    channel, accumulated while the block ran: the inputs themselves are not kept), or None without calibration.
    `producer`: the op whose output channels produce those inputs (a norm or a linear), which can absorb a
    per-input-channel scale (`GroupResult.input_scale`); None where there is none.
    """

    modules: tuple[str, ...]
    planned: dict[str, PlannedModule]
    weights: dict[str, torch.Tensor]
    statistics: InputStatistics | None = None
    producer: str | None = None
    gptq: GptqSettings = GptqSettings()
    nvfp4_alpha: float = 1.0  # NVFP4 block-scale inflation (quantizers.nvfp4)

    @property
    def hessian(self) -> torch.Tensor:
        """`H = 2/n · Σ xᵀx` of the inputs, float32 `[K, K]` (shared: copy it to change it)."""
        return self._statistics.hessian

    def release_hessian(self) -> torch.Tensor:
        """The Hessian given away (`InputStatistics.release_hessian`), for a method that is its last reader and
        changes it in place."""
        return self._statistics.release_hessian()

    @property
    def input_abs_mean(self) -> torch.Tensor:
        """Mean `|x|` per input channel, float32 `[K]`."""
        return self._statistics.abs_mean

    @property
    def _statistics(self) -> InputStatistics:
        if self.statistics is None:
            raise ValueError(f"{self.modules[0]}: input statistics of a group that came without inputs")
        return self.statistics


@dataclass
class GroupResult:
    """What a method made of a group.

    `stored`: every planned module's stored tensors (the names and layout of format.layout).
    `references`: a module's float weight `[N, K]` that its stored tensors encode, where that is not its weight
    in the group (AWQ: the scaled weight); the manifest's error is measured against it.
    `input_scale [K]`: the stored weights expect the group's inputs divided by it; the walk then folds it into
    the producer and multiplies the group's float linears by it (needs `LinearGroup.producer`).
    `notes`: recorded in the checkpoint's calibration provenance, section -> name -> value.
    """

    stored: dict[str, dict[str, torch.Tensor]]
    references: dict[str, torch.Tensor] = field(default_factory=dict)
    input_scale: torch.Tensor | None = None
    notes: dict[str, dict[str, float]] = field(default_factory=dict)


class QuantMethod(ABC):
    """A quantization algorithm, registered under `name` (`registry.register_method`)."""

    name: ClassVar[str]
    # the blocks are walked on calibration text and every group comes with its inputs (`--calib` is required)
    needs_calibration: ClassVar[bool] = True
    # may return `input_scale`: float weights outside the quantized linears change, so the checkpoint no longer
    # holds the source model's other weights (end-to-end tuning refuses it)
    folds_scales: ClassVar[bool] = False
    # the scheme kinds it can quantize (None: every kind)
    kinds: ClassVar[tuple[SchemeKind, ...] | None] = None

    def quantizes(self, scheme: Scheme) -> bool:
        """Whether this method can quantize a linear to `scheme`."""
        return self.kinds is None or scheme.kind in self.kinds

    @abstractmethod
    def quantize_group(self, group: LinearGroup) -> GroupResult:
        """The stored tensors of `group.planned`."""
