"""The `nano::` torch custom ops (with fake implementations), so torch.compile and CUDA graphs see each
quantized GEMM or lookup as one opaque op. Triton is imported only when a CUDA op runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format.activations import int8_dynamic_linear as int8_dynamic_linear_spec
from ..format.reference import dequantize, gather_rows, rotated_codebook_weight
from ..format.schemes import INT8_CHANNEL, NVFP4, NVFP4_GROUP_SIZE, Scheme, SchemeKind

# The ops take (qweight, scales, third, bits, group_size). group_size 0 means int8 per channel. `third` is
# None (symmetric), the uint8 zeros (asymmetric), or a float32 tensor: nvfp4's global scale `[1]` when
# group_size is 16, else a codebook's levels `[2**b]` — then the op multiplies by the *rotated* weight and
# the caller has rotated the activations (format.hadamard.rotate_inputs).


def _scheme(bits: int, group_size: int, third: torch.Tensor | None) -> Scheme:
    if group_size == 0:
        return INT8_CHANNEL
    if group_size == NVFP4_GROUP_SIZE:
        return NVFP4
    if third is not None and third.dtype == torch.float32:
        return Scheme(SchemeKind.CODEBOOK, bits, group_size)
    return Scheme(SchemeKind.INT_GROUP, bits, group_size, symmetric=third is None)


_THIRD_NAME = {SchemeKind.INT_GROUP: "zeros", SchemeKind.NVFP4: "global_scale", SchemeKind.CODEBOOK: "codebook"}


def _stored(qweight: torch.Tensor, scales: torch.Tensor, third: torch.Tensor | None,
            scheme: Scheme) -> dict[str, torch.Tensor]:
    tensors = {"qweight": qweight, "scales": scales}
    if third is not None:
        tensors[_THIRD_NAME[scheme.kind]] = third
    return tensors


def triton_weight_format(bits: int, group_size: int, third: torch.Tensor | None):
    """The constexpr weight description of `triton_gemm` (imports Triton)."""
    from .triton_dequant import FMT_CODEBOOK, FMT_INT8_CHANNEL, FMT_INT_GROUP
    from .triton_gemm import WeightFormat

    scheme = _scheme(bits, group_size, third)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return WeightFormat(FMT_INT8_CHANNEL, 8, 0, False)
    if scheme.kind is SchemeKind.CODEBOOK:
        return WeightFormat(FMT_CODEBOOK, bits, group_size, False)
    return WeightFormat(FMT_INT_GROUP, bits, group_size, third is not None)


@torch.library.custom_op("nano::reference_linear", mutates_args=())
def reference_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bits: int, group_size: int, out_features: int,
) -> torch.Tensor:
    """`x [..., K]` @ dequantized stored weight (format.reference) -> `[..., N]` in x.dtype (see the note above
    on `zeros`: a codebook's x is already rotated)."""
    scheme = _scheme(bits, group_size, zeros)
    in_features = x.shape[-1]
    stored = _stored(qweight, scales, zeros, scheme)
    if scheme.kind is SchemeKind.CODEBOOK:
        weight = rotated_codebook_weight(stored, scheme, out_features, in_features).to(x.dtype)
    else:
        weight = dequantize(stored, scheme, out_features, in_features, dtype=x.dtype)
    return F.linear(x, weight.contiguous())  # [N, K] row-major: the layout CPU GEMMs are fast on


@reference_linear.register_fake
def _(x, qweight, scales, zeros, bits, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("nano::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Scheme int8-a8 by its spec (format.activations): `x [..., K]`, qweight int8 `[K, N]`, scales `[N]` ->
    `[..., N]` in x.dtype."""
    return int8_dynamic_linear_spec(x, qweight, scales)


@int8_dynamic_linear.register_fake
def _(x, qweight, scales):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op("nano::triton_linear", mutates_args=())
def triton_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bits: int, group_size: int, out_features: int,
) -> torch.Tensor:
    """Fused Triton dequantize-GEMM on the stored tensors; same contract as `reference_linear`."""
    from .triton_gemm import dequant_gemm

    return dequant_gemm(x, qweight, scales, zeros, triton_weight_format(bits, group_size, zeros), out_features)


@triton_linear.register_fake
def _(x, qweight, scales, zeros, bits, group_size, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("nano::embedding", mutates_args=())
def embedding(
    ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bits: int, group_size: int, embedding_dim: int, dtype: torch.dtype,
) -> torch.Tensor:
    """Rows `ids [...]` of a quantized table stored as a linear (N = vocab, K = embedding_dim) -> `[..., K]`."""
    if qweight.is_cuda:
        from .triton_embedding import embedding_gather

        return embedding_gather(ids, qweight, scales, zeros, triton_weight_format(bits, group_size, zeros),
                                embedding_dim, dtype)
    scheme = _scheme(bits, group_size, zeros)
    rows = gather_rows(_stored(qweight, scales, zeros, scheme), scheme, ids, embedding_dim, dtype)
    return rows.reshape(*ids.shape, embedding_dim).contiguous()


@embedding.register_fake
def _(ids, qweight, scales, zeros, bits, group_size, embedding_dim, dtype):
    return ids.new_empty((*ids.shape, embedding_dim), dtype=dtype)
