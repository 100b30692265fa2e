"""The `nano::` torch custom ops (with fake implementations), so torch.compile and CUDA graphs see each
quantized GEMM or lookup as one opaque op. Triton is imported only when a CUDA op runs.

The ops take the scheme by name (`scheme.name`, parsed back with `format.schemes.parse_scheme`) and the
stored tensors its kind's kernels read, in the kind's order (`scheme.kind.kernel_tensors(scheme)`; see
`op_tensors`). A kind whose codes describe a rotated weight (the codebooks) gets rotated activations: the
caller applies `scheme.kind.input_rotation` first (format.hadamard.rotate_inputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..format.activations import int8_dynamic_linear as int8_dynamic_linear_spec
from ..format.reference import gather_rows, kernel_weight
from ..format.schemes import Scheme, parse_scheme


def op_tensors(stored: Mapping[str, torch.Tensor], scheme: Scheme) -> list[torch.Tensor]:
    """The tensors an op takes for `scheme`, in its kind's order."""
    return [stored[name] for name in scheme.kind.kernel_tensors(scheme)]


def named_tensors(tensors: list[torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """Inverse of `op_tensors`: the op's tensor list back as a name -> tensor dict."""
    return dict(zip(scheme.kind.kernel_tensors(scheme), tensors))


def triton_weight_format(scheme: Scheme, tensors: Mapping[str, torch.Tensor]):
    """The constexpr weight description of `triton_gemm` and the tensor in its side slot (imports Triton)."""
    from .triton_gemm import weight_format_of

    return weight_format_of(scheme, tensors)


@torch.library.custom_op("nano::reference_linear", mutates_args=())
def reference_linear(x: torch.Tensor, tensors: list[torch.Tensor], scheme: str, out_features: int) -> torch.Tensor:
    """`x [..., K]` @ the weight the stored tensors describe (format.reference.kernel_weight) -> `[..., N]` in
    x.dtype (a codebook's x is already rotated: module docstring)."""
    parsed = parse_scheme(scheme)
    weight = kernel_weight(named_tensors(tensors, parsed), parsed, out_features, x.shape[-1], x.dtype)
    return F.linear(x, weight.contiguous())  # [N, K] row-major: the layout CPU GEMMs are fast on


@reference_linear.register_fake
def _(x, tensors, scheme, out_features):
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
def triton_linear(x: torch.Tensor, tensors: list[torch.Tensor], scheme: str, out_features: int) -> torch.Tensor:
    """Fused Triton dequantize-GEMM on the stored tensors; same contract as `reference_linear`."""
    from .triton_gemm import dequant_gemm

    parsed = parse_scheme(scheme)
    weight, side = triton_weight_format(parsed, named_tensors(tensors, parsed))
    return dequant_gemm(x, tensors[0], tensors[1], side, weight, out_features)


@triton_linear.register_fake
def _(x, tensors, scheme, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("nano::embedding", mutates_args=())
def embedding(ids: torch.Tensor, tensors: list[torch.Tensor], scheme: str, embedding_dim: int,
              dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids [...]` of a quantized table stored as a linear (N = vocab, K = embedding_dim) -> `[..., K]`."""
    parsed = parse_scheme(scheme)
    stored = named_tensors(tensors, parsed)
    if tensors[0].is_cuda:
        from .triton_embedding import embedding_gather

        weight, side = triton_weight_format(parsed, stored)
        return embedding_gather(ids, tensors[0], tensors[1], side, weight, embedding_dim, dtype)
    rows = gather_rows(stored, parsed, ids, embedding_dim, dtype)
    return rows.reshape(*ids.shape, embedding_dim).contiguous()


@embedding.register_fake
def _(ids, tensors, scheme, embedding_dim, dtype):
    return ids.new_empty((*ids.shape, embedding_dim), dtype=dtype)
