"""The contract every quantized-linear kernel meets (one file per kernel family implements it).

A kernel says whether it can run a layer (`can_implement`, with the reason when it cannot), repacks the
stored tensors once after loading (`prepare`), and computes `x @ W.T` from the repacked tensors
(`apply`). `dispatch.select_kernel` walks a priority list per device and picks the first that fits. A CPU kernel
whose `apply` is one op may also say which (`row_op`, see cpu_grouped): a MoE layer's experts then share one
parallel region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..format.schemes import Scheme


@dataclass(frozen=True)
class LinearConfig:
    """What a kernel needs to know about one layer: weight `[out_features, in_features]` in `scheme`."""

    scheme: Scheme
    out_features: int
    in_features: int
    act_dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"
    rotated_inputs: bool = False  # codebook only: the caller passes `R x` (kernels.ops.PreparedParts rotates once)


class LinearKernel(Protocol):
    """A weight-only quantized GEMM implementation."""

    name: str

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        """(True, "") if this kernel runs `config`, else (False, why not)."""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """Repack the stored tensors (`format.layout` names and shapes) once; the result is what `apply` reads."""

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., in_features]` -> `[..., out_features]` in x.dtype (no bias)."""
