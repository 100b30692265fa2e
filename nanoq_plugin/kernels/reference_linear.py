"""The reference kernel: dequantize the stored weight (format.reference), then matmul. Runs everywhere."""

from __future__ import annotations

import torch

from ..format.hadamard import rotate_inputs
from .base import LinearConfig
from .custom_ops import embedding, int8_dynamic_linear, op_tensors, reference_linear


class StoredTensorKernel:
    """A kernel that reads the stored tensors as they are (no repack): `linear_op` is its `nano::` op, called with
    the scheme's name and the tensors its kind's kernels read (custom_ops.op_tensors)."""

    supports_gather = True
    linear_op = None  # set by each subclass

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        scheme = config.scheme
        rotation = None if config.rotated_inputs else scheme.kind.input_rotation(prepared, scheme)
        if rotation is not None:  # the kind's codes describe the rotated weight
            x = rotate_inputs(x, *rotation)
        return self.linear_op(x, op_tensors(prepared, scheme), scheme.name, config.out_features)

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows through `nano::embedding` (the Triton gather on CUDA, the reference elsewhere)."""
        scheme = config.scheme
        return embedding(ids, op_tensors(prepared, scheme), scheme.name, config.in_features, dtype)


class ReferenceKernel(StoredTensorKernel):
    """Dequantize per call; the fallback when no faster kernel fits."""

    name = "reference"
    linear_op = reference_linear

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        if not config.scheme.is_quantized:
            return False, "float modules use the engine's own linear"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype; int8-a8 quantizes x per token first (format.activations)."""
        if config.scheme.quantizes_activations:
            return int8_dynamic_linear(x, prepared["qweight"], prepared["scales"])
        return super().apply(x, prepared, config)
