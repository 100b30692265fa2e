"""The PyTorch reference of every packed format: the executable spec that kernels are tested against.

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
from .hadamard import unrotate_weight
from .fp4 import decode_e2m1, encode_e2m1, pack_fp4, unpack_fp4
from .layout import NVFP4_SCALE_DTYPE, SCALE_DTYPE, ZERO_DTYPE, check_shape_fits, param_specs
from .packing import pack_codes, unpack_codes
from .schemes import Scheme, SchemeKind


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of a symmetric `bits`-bit group scheme."""
    return 1 << (bits - 1)


def _expand_groups(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[K/G, N]` -> `[K, N]` by repeating each group row G times."""
    return per_group.repeat_interleave(group_size, dim=0)


def encode_codes(
    weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """Round `weight [N, K]` to codes `[K, N]` with the given scales (and zeros).

    int_group: scales `[K/G, N]`, zeros uint8 `[K/G, N]` or None (symmetric) -> uint8 codes.
    int8: scales `[N]` -> int8 codes in [-127, 127]. Scales are rounded to float16 first.
    """
    w_t = weight.t().to(torch.float32)
    s = scales.to(SCALE_DTYPE).to(torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return torch.clamp(torch.round(w_t / s.view(1, -1)), -127, 127).to(torch.int8)
    if scheme.kind is not SchemeKind.INT_GROUP:
        raise NanoqError(f"scheme {scheme.name} has no codes")
    max_code = (1 << scheme.bits) - 1
    z = symmetric_zero(scheme.bits) if zeros is None else _expand_groups(zeros.to(torch.float32), scheme.group_size)
    q = torch.round(w_t / _expand_groups(s, scheme.group_size)) + z
    return torch.clamp(q, 0, max_code).to(torch.uint8)


def compress(
    weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Encode and pack `weight [N, K]` into the named tensors of `layout.param_specs(scheme, N, K)`.

    nvfp4: `scales` are the FP8 block scales `[K/16, N]` (any float dtype, rounded to E4M3 here) and `zeros`
    is the float32 `global_scale [1]`.
    """
    n, k = weight.shape
    check_shape_fits(scheme, n, k, "weight")
    if scheme.kind is SchemeKind.NVFP4:
        return _compress_nvfp4(weight, scheme, scales, zeros)
    if scheme.kind is SchemeKind.CODEBOOK:
        raise NanoqError("codebook schemes are encoded by quantizers.codebook.compress_codebook")
    if scheme.kind is SchemeKind.INT_GROUP and scheme.symmetric != (zeros is None):
        raise NanoqError(f"scheme {scheme.name}: zeros must be given exactly when the scheme is asymmetric")
    codes = encode_codes(weight, scheme, scales, zeros)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return {"qweight": codes.contiguous(), "scales": scales.to(SCALE_DTYPE).reshape(n).contiguous()}
    out = {"qweight": pack_codes(codes, scheme.bits), "scales": scales.to(SCALE_DTYPE).contiguous()}
    if zeros is not None:
        out["zeros"] = zeros.to(ZERO_DTYPE).contiguous()
    return out


def _compress_nvfp4(weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor,
                    global_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    stored_scales = scales.to(NVFP4_SCALE_DTYPE)
    step = _expand_groups(stored_scales.to(torch.float32), scheme.group_size) / global_scale.to(torch.float32)
    step = torch.where(step == 0, torch.ones_like(step), step)  # an all-zero block: every code is 0 anyway
    codes = encode_e2m1(weight.t().to(torch.float32) / step)
    return {"qweight": pack_fp4(codes, 0), "scales": stored_scales.contiguous(),
            "global_scale": global_scale.to(torch.float32).reshape(1).contiguous()}


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
    specs = param_specs(scheme, out_features, in_features)
    for name, spec in specs.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise NanoqError(f"missing tensor '{name}' for scheme {scheme.name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise NanoqError(
                f"tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"expected {spec.describe()} for scheme {scheme.name}"
            )
    scales = tensors["scales"].to(torch.float32)
    if scheme.kind is SchemeKind.NVFP4:
        values = decode_e2m1(unpack_fp4(tensors["qweight"], 0))
        step = _expand_groups(scales, scheme.group_size) / tensors["global_scale"].to(torch.float32)
        return (values * step).t().to(dtype)
    if scheme.kind is SchemeKind.CODEBOOK:
        return unrotate_weight(rotated_codebook_weight(tensors, scheme, out_features, in_features),
                               tensors["signs"], scheme.group_size).to(dtype)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        weight_t = tensors["qweight"].to(torch.float32) * scales.view(1, -1)
        return weight_t.t().to(dtype)
    groups, g = in_features // scheme.group_size, scheme.group_size
    codes = unpack_codes(tensors["qweight"], scheme.bits).view(groups, g, out_features).to(torch.float32)
    if scheme.symmetric:
        centered = codes - float(symmetric_zero(scheme.bits))
    else:
        centered = codes - tensors["zeros"].to(torch.float32).view(groups, 1, out_features)
    weight_t = (centered * scales.view(groups, 1, out_features)).view(in_features, out_features)
    return weight_t.t().to(dtype)


def rotated_codebook_weight(tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                            in_features: int) -> torch.Tensor:
    """The rotated weight `W' [N, K]` float32 of a codebook scheme: levels of the codes times group scales."""
    codes = unpack_codes(tensors["qweight"], scheme.bits).long()  # [K, N]
    levels = tensors["codebook"].to(torch.float32)[codes]
    scales = _expand_groups(tensors["scales"].to(torch.float32), scheme.group_size)
    return (levels * scales).t()


def gather_rows(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    ids: torch.Tensor,
    embedding_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows `ids [T]` of a quantized embedding table `[V, H]` -> `[T, H]` in `dtype`.

    A table is stored as the weight of a linear with N = V outputs and K = H = `embedding_dim` inputs
    (the layout of a tied LM head), so row `v` is column `v` of every stored tensor.
    """
    flat = ids.reshape(-1).long()
    columns = {name: tensor[..., flat] for name, tensor in tensors.items()}
    return dequantize(columns, scheme, flat.numel(), embedding_dim, dtype)
