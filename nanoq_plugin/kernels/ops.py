"""Quantized linear as torch custom ops (`nano::*`), so torch.compile and CUDA graphs see one opaque op.

On every device this release runs the reference path (dequantize with `format.reference`, then matmul).
Fused Triton kernels and PyTorch's CPU weight-only kernels plug in behind the same ops.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..format.reference import dequantize
from ..format.schemes import INT8_CHANNEL, Scheme, SchemeKind


@torch.library.custom_op("nano::int_group_linear", mutates_args=())
def int_group_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """`x [..., K]` (fp32/fp16/bf16) @ dequantized int_group weight -> `[..., N]` in x.dtype.

    qweight int32 `[K*bits/32, N]`, scales float16 `[K/G, N]`, zeros uint8 `[K/G, N]` or None (symmetric).
    """
    out_features = qweight.shape[1]
    in_features = qweight.shape[0] * 32 // bits
    scheme = Scheme(SchemeKind.INT_GROUP, bits, group_size, symmetric=zeros is None)
    tensors = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    weight = dequantize(tensors, scheme, out_features, in_features, dtype=x.dtype)
    return F.linear(x, weight)


@int_group_linear.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op("nano::int8_channel_linear", mutates_args=())
def int8_channel_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` @ dequantized per-channel int8 weight -> `[..., N]`; qweight int8 `[K, N]`, scales fp16 `[N]`."""
    in_features, out_features = qweight.shape
    weight = dequantize({"qweight": qweight, "scales": scales}, INT8_CHANNEL, out_features, in_features, dtype=x.dtype)
    return F.linear(x, weight)


@int8_channel_linear.register_fake
def _(x, qweight, scales):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def quantized_linear(
    x: torch.Tensor, tensors: Mapping[str, torch.Tensor], scheme: Scheme, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply one quantized linear: `x [..., K]` -> `[..., N]` (+ bias), `tensors` as in `format.layout`."""
    if scheme.kind is SchemeKind.INT_GROUP:
        out = int_group_linear(
            x, tensors["qweight"], tensors["scales"], tensors.get("zeros"), scheme.bits, scheme.group_size
        )
    elif scheme.kind is SchemeKind.INT8_CHANNEL:
        out = int8_channel_linear(x, tensors["qweight"], tensors["scales"])
    else:
        raise ValueError(f"scheme {scheme.name} is not a quantized scheme")
    return out if bias is None else out + bias.to(out.dtype)
