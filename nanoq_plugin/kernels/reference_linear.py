"""The reference kernel: dequantize the stored weight (format.reference), then matmul. Runs everywhere."""

from __future__ import annotations

import torch

from ..format.hadamard import rotate_inputs
from ..format.schemes import SchemeKind
from .base import LinearConfig
from .custom_ops import embedding, int8_dynamic_linear, reference_linear


def op_args(config: LinearConfig) -> tuple[int, int]:
    """(bits, group_size) as the custom ops take them (custom_ops: 0 is int8 per channel, 16 is nvfp4)."""
    scheme = config.scheme
    return scheme.bits, 0 if scheme.kind is SchemeKind.INT8_CHANNEL else scheme.group_size


def third_tensor(prepared: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What the ops take in their `zeros` slot (custom_ops): the zeros, nvfp4's global scale, or the codebook."""
    for name in ("zeros", "global_scale", "codebook"):
        if name in prepared:
            return prepared[name]
    return None


class StoredTensorKernel:
    """A kernel that reads the stored tensors as they are (no repack): `linear_op` is its `nano::` op."""

    supports_gather = True
    linear_op = None  # set by each subclass

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        bits, group_size = op_args(config)
        if config.scheme.kind is SchemeKind.CODEBOOK and not config.rotated_inputs:  # codes describe W' = W Rᵀ
            x = rotate_inputs(x, prepared["signs"], group_size)
        return self.linear_op(x, prepared["qweight"], prepared["scales"], third_tensor(prepared),
                              bits, group_size, config.out_features)

    def gather_rows(self, ids: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig,
                    dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows through `nano::embedding` (the Triton gather on CUDA, the reference elsewhere)."""
        bits, group_size = op_args(config)
        return embedding(ids, prepared["qweight"], prepared["scales"], third_tensor(prepared),
                         bits, group_size, config.in_features, dtype)


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
