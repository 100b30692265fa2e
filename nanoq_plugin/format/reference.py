"""The PyTorch reference of every packed format: the executable spec that kernels are tested against. Each
scheme kind (format.kinds) implements its part; these functions validate the stored tensors and ask the kind.

Integer group-wise (`int_group`), weight `W [N, K]`, codes `q [K, N]` in `[0, 2**b)`:

    W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]

with `s` the float16 scales and `z` the uint8 zeros (asymmetric) or the constant `2**(b-1)` (symmetric).
Per-channel int8 (`int8`): codes `q [K, N]` int8 in `[-127, 127]`, `W[n, k] = q[k, n] * s[n]`.
NVFP4 (`nvfp4`): E2M1 codes `q [K, N]` (format.fp4, packed two per byte along K), FP8 E4M3 scales
`s [K/16, N]` and a float32 `global_scale` (compressed-tensors' convention: it divides):

    W[n, k] = e2m1(q[k, n]) * s[k // 16, n] / global_scale

Codebook (`cb{b}g{G}`): codes `q [K, N]` packed like int_group, float16 scales `s [K/G, N]`, float32 levels
`c [2**b]` and int8 `signs [K]` of the rotation `R` (format.hadamard). The codes describe the rotated weight:

    W' [n, k] = c[q[k, n]] * s[k // G, n]        W = W' R  (format.hadamard.unrotate_weight)

Quantizers choose the scales (RTN, GPTQ, ...); `compress` rounds with the *stored* (float16) scales, so
`dequantize(compress(W, ...))` equals the fake-quantized weight bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import NanoqError
from .kinds.int_group import symmetric_zero
from .layout import param_specs
from .schemes import Scheme
from .tensor_spec import Sharding

__all__ = ["compress", "dequantize", "gather_rows", "kernel_weight", "symmetric_zero"]


def compress(
    weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Encode and pack `weight [N, K]` with the given scales into the named tensors of `param_specs(scheme, N, K)`.

    int_group: scales `[K/G, N]`, zeros uint8 `[K/G, N]` or None (symmetric). int8: scales `[N]`.
    nvfp4: `scales` are the FP8 block scales `[K/16, N]` (any float dtype, rounded to E4M3 here) and `zeros`
    is the float32 `global_scale [1]`. Scales are rounded to their stored dtype before the codes are chosen.
    """
    n, k = weight.shape
    scheme.kind.check_shape_fits(scheme, n, k, "weight")
    compress_kind = getattr(scheme.kind, "compress", None)
    if compress_kind is None:
        raise NanoqError(f"scheme {scheme.name} has no scale-based encoder")
    return compress_kind(weight, scheme, scales, zeros)


def _validated(tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int, in_features: int,
               names=None) -> None:
    specs = param_specs(scheme, out_features, in_features)
    for name in names if names is not None else specs:
        spec, tensor = specs[name], tensors.get(name)
        if tensor is None:
            raise NanoqError(f"missing tensor '{name}' for scheme {scheme.name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise NanoqError(
                f"tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"expected {spec.describe()} for scheme {scheme.name}"
            )


def dequantize(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference dequantizer: stored tensors of one linear -> weight `[out_features, in_features]` in `dtype`.

    Computes in float32 and casts once at the end.
    """
    _validated(tensors, scheme, out_features, in_features)
    return scheme.kind.dequantize(tensors, scheme, out_features, in_features).to(dtype)


def kernel_weight(tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int, in_features: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight `[N, K]` in `dtype` that a kernel multiplies by, from the tensors the kind's kernels read
    (`kind.kernel_tensors`): the weight itself, or the rotated one where the kind rotates the inputs."""
    _validated(tensors, scheme, out_features, in_features, scheme.kind.kernel_tensors(scheme))
    return scheme.kind.kernel_weight(tensors, scheme, out_features, in_features).to(dtype)


def gather_rows(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    ids: torch.Tensor,
    embedding_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows `ids [T]` of a quantized embedding table `[V, H]` -> `[T, H]` in `dtype`.

    A table is stored as the weight of a linear with N = V outputs and K = H = `embedding_dim` inputs
    (the layout of a tied LM head), so row `v` is column `v` of every stored tensor whose last dim is N.
    """
    flat = ids.reshape(-1).long()
    specs = param_specs(scheme, 1, embedding_dim)
    per_output = {name for name, spec in specs.items() if spec.sharding in (Sharding.INPUT_OUTPUT, Sharding.OUTPUT)}
    columns = {name: tensor[..., flat] if name in per_output else tensor for name, tensor in tensors.items()}
    return dequantize(columns, scheme, flat.numel(), embedding_dim, dtype)
