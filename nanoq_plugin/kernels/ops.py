"""The kernels' public API: prepare a quantized linear once after loading, then apply it per call.

    prepared = prepare_linear(stored_tensors, scheme, out_features, in_features, act_dtype, device_type)
    y = apply_linear(x, prepared, bias)            # x [..., K] -> y [..., N]
    rows = gather_embedding(ids, prepared, dtype)  # quantized embedding table: ids [...] -> [..., K]

`prepare_linear` picks the kernel (`dispatch`): Triton on CUDA; on the CPU PyTorch's weight-only int8 /
int4 kernels where the scheme fits, the reference (dequantize, then matmul) otherwise. Engines keep
`prepared.tensors` as the layer's parameters (the stored tensors they replace can be freed).
`quantized_linear` runs directly on stored tensors (no repack): Triton on CUDA, the reference elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..format.schemes import Scheme
from .base import LinearConfig
from .dispatch import KERNELS, select_kernel
from .reference_linear import ReferenceKernel
from .triton_linear import TritonKernel


@dataclass
class PreparedLinear:
    """A quantized weight repacked for one kernel (`kernel` names it in `dispatch.KERNELS`)."""

    kernel: str
    config: LinearConfig
    tensors: dict[str, torch.Tensor]


def prepare_linear(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    out_features: int,
    in_features: int,
    act_dtype: torch.dtype,
    device_type: str | None = None,
    is_embedding: bool = False,
    where: str = "layer",
) -> PreparedLinear:
    """Choose the kernel for stored `tensors` (format.layout names) and repack them once for it."""
    device_type = device_type or tensors["qweight"].device.type
    config = LinearConfig(scheme, out_features, in_features, act_dtype, device_type)
    kernel = select_kernel(config, needs_gather=is_embedding, where=where)
    return PreparedLinear(kernel.name, config, kernel.prepare(dict(tensors), config))


def apply_linear(x: torch.Tensor, prepared: PreparedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [..., K]` -> `[..., N]` in x.dtype (+ bias)."""
    out = KERNELS[prepared.kernel].apply(x, prepared.tensors, prepared.config)
    return out if bias is None else out + bias.to(out.dtype)


def gather_embedding(ids: torch.Tensor, prepared: PreparedLinear, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids [...]` of a quantized table prepared with `is_embedding=True` -> `[..., K]` in `dtype`."""
    return KERNELS[prepared.kernel].gather_rows(ids, prepared.tensors, prepared.config, dtype)


def _direct_kernel(device_type: str, config: LinearConfig):
    triton = TritonKernel()
    return triton if device_type == "cuda" and triton.can_implement(config)[0] else ReferenceKernel()


def quantized_linear(
    x: torch.Tensor, tensors: Mapping[str, torch.Tensor], scheme: Scheme, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One quantized linear on stored tensors (no repack): `x [..., K]` -> `[..., N]` (+ bias)."""
    qweight = tensors["qweight"]
    out_features = qweight.shape[1]
    config = LinearConfig(scheme, out_features, x.shape[-1], x.dtype, x.device.type)
    out = _direct_kernel(x.device.type, config).apply(x, dict(tensors), config)
    return out if bias is None else out + bias.to(out.dtype)


def quantized_embedding(
    ids: torch.Tensor, tensors: Mapping[str, torch.Tensor], scheme: Scheme, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids [...]` of a stored quantized table (N = vocab, K = embedding_dim) -> `[..., K]` in `dtype`."""
    qweight = tensors["qweight"]
    config = LinearConfig(scheme, qweight.shape[1], embedding_dim, dtype, qweight.device.type)
    return _direct_kernel(qweight.device.type, config).gather_rows(ids, dict(tensors), config, dtype)
