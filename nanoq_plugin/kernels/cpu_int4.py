"""Group-wise int2/int3/int4 on the CPU through PyTorch's weight-only kernel `aten._weight_int4pack_mm_for_cpu`.

That kernel computes `W[n, k] = (q[n, k] - 8) * s[k // G, n] + z[k // G, n]` with 4-bit codes `q` packed by
`aten._convert_weight_to_int4pack_for_cpu` and `scale_zeros [K/G, N, 2]` (s, z) in the activation dtype.
Our codes satisfy `W = (c - zero) * scale` (docs/FORMAT.md), so the repack once after loading is

    q = c + shift,  shift = clamp(8 - zero, 0, 16 - 2**b),  z = (8 - shift - zero) * scale

which keeps `z = 0` for every symmetric scheme (2**(b-1) + shift = 8), so no precision is lost in z.
Codes of fewer than 4 bits are held in 4 bits after the repack (0.5 byte per weight instead of b/8).
The kernel needs N a multiple of 16.
"""

from __future__ import annotations

import torch

from ..format.packing import unpack_codes
from ..format.reference import symmetric_zero
from ..format.schemes import SchemeKind
from .base import LinearConfig

# 16-bit activations only: measured here, their float32 path is 20-80x slower than MKL's float32 GEMM on the
# dequantized weight at prefill sizes (the reference kernel), so float32 models use the reference.
ACT_DTYPES = (torch.bfloat16, torch.float16)
GROUP_SIZES = (32, 64, 128, 256)


class CpuInt4GroupKernel:
    """`x @ W.T` with group-wise 2/3/4-bit weights, on the CPU."""

    name = "cpu_int4pack"
    supports_gather = False

    def can_implement(self, config: LinearConfig) -> tuple[bool, str]:
        scheme = config.scheme
        if config.device_type != "cpu":
            return False, f"runs on the CPU only (device {config.device_type})"
        if scheme.kind is not SchemeKind.INT_GROUP or scheme.bits > 4:
            return False, f"needs a group-wise scheme of at most 4 bits (scheme {scheme.name})"
        if scheme.group_size not in GROUP_SIZES:
            return False, f"group size {scheme.group_size} is not one of {GROUP_SIZES}"
        if config.out_features % 16:
            return False, f"output features ({config.out_features}) must be a multiple of 16"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
        if config.act_dtype not in ACT_DTYPES:
            return False, f"activation dtype {config.act_dtype} is not one of {ACT_DTYPES}"
        return True, ""

    def prepare(self, tensors: dict[str, torch.Tensor], config: LinearConfig) -> dict[str, torch.Tensor]:
        """Stored qweight/scales/zeros -> `packed` uint8 `[N, K/2]` and `scale_zeros [K/G, N, 2]` (activation dtype)."""
        scheme = config.scheme
        groups, g = config.in_features // scheme.group_size, scheme.group_size
        scales = tensors["scales"].to(torch.float32)
        if scheme.symmetric:
            zeros = torch.full_like(scales, float(symmetric_zero(scheme.bits)))
        else:
            zeros = tensors["zeros"].to(torch.float32)
        shift = torch.clamp(8 - zeros, 0, 16 - (1 << scheme.bits))  # [K/G, N]
        codes = unpack_codes(tensors["qweight"], scheme.bits).to(torch.int32).view(groups, g, config.out_features)
        codes = (codes + shift.to(torch.int32).unsqueeze(1)).view(config.in_features, config.out_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
        offsets = (8 - shift - zeros) * scales
        scale_zeros = torch.stack([scales, offsets], dim=-1).to(config.act_dtype).contiguous()
        return {"packed": packed, "scale_zeros": scale_zeros}

    def apply(self, x: torch.Tensor, prepared: dict[str, torch.Tensor], config: LinearConfig) -> torch.Tensor:
        """`x [..., K]` -> `[..., N]` in x.dtype."""
        scale_zeros = prepared["scale_zeros"]
        if scale_zeros.dtype != x.dtype:
            scale_zeros = scale_zeros.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, prepared["packed"], config.scheme.group_size, scale_zeros)
        return out.view(*x.shape[:-1], config.out_features)
