"""Kind `nvfp4`: FP4 E2M1 values, an FP8 E4M3 scale per 16 inputs, one float32 global scale (compressed-tensors'
convention: it divides). Weight `W [N, K]`:

    qweight uint8 [K/2, N] (two codes per byte along K)   scales float8_e4m3fn [K/16, N]   global_scale float32 [1]
    W[n, k] = e2m1(q[k, n]) * s[k // 16, n] / global_scale
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import NanoqError
from ..tensor_spec import Sharding, TensorSpec, expand_groups
from .base import Scheme, SchemeKind, register_kind

if TYPE_CHECKING:
    import torch

NVFP4_GROUP_SIZE = 16


class Nvfp4Kind(SchemeKind):
    value = "nvfp4"
    grammar = "nvfp4"
    gathers_rows = False  # its linears' kernels only; a table is stored as int8 / int4gG

    def parse(self, name: str) -> Scheme | None:
        return Scheme(self, bits=4, group_size=NVFP4_GROUP_SIZE) if name == "nvfp4" else None

    def validate(self, scheme: Scheme) -> None:
        if scheme.bits != 4 or scheme.group_size != NVFP4_GROUP_SIZE or not scheme.symmetric:
            raise NanoqError("scheme nvfp4 is 4 bits, symmetric, in groups of 16")

    def scheme_name(self, scheme: Scheme) -> str:
        return "nvfp4"

    def from_dict(self, data: dict, activation_bits: int) -> Scheme:
        return Scheme(self, int(data.get("bits", 4)), int(data.get("group_size", NVFP4_GROUP_SIZE)),
                      activation_bits=activation_bits)

    def check_shape_fits(self, scheme: Scheme, out_features: int, in_features: int, where: str) -> None:
        if in_features % scheme.group_size:
            raise NanoqError(f"{where}: nvfp4 needs an input dim that is a multiple of 16, got {in_features}")

    def input_block(self, scheme: Scheme) -> int:
        return scheme.group_size

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        import torch

        self.check_shape_fits(scheme, out_features, in_features, "linear")
        return {"qweight": TensorSpec((in_features // 2, out_features), torch.uint8),
                "scales": TensorSpec((in_features // scheme.group_size, out_features), torch.float8_e4m3fn),
                "global_scale": TensorSpec((1,), torch.float32, Sharding.REPLICATED)}

    def compress(self, weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor,
                 global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`scales`: the FP8 block scales `[K/16, N]` (any float dtype, rounded to E4M3 here); `global_scale [1]`."""
        import torch

        from ..fp4 import encode_e2m1, pack_fp4

        stored_scales = scales.to(torch.float8_e4m3fn)
        step = expand_groups(stored_scales.to(torch.float32), scheme.group_size) / global_scale.to(torch.float32)
        step = torch.where(step == 0, torch.ones_like(step), step)  # an all-zero block: every code is 0 anyway
        codes = encode_e2m1(weight.t().to(torch.float32) / step)
        return {"qweight": pack_fp4(codes, 0), "scales": stored_scales.contiguous(),
                "global_scale": global_scale.to(torch.float32).reshape(1).contiguous()}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                   in_features: int) -> torch.Tensor:
        import torch

        from ..fp4 import decode_e2m1, unpack_fp4

        values = decode_e2m1(unpack_fp4(tensors["qweight"], 0))
        step = (expand_groups(tensors["scales"].to(torch.float32), scheme.group_size)
                / tensors["global_scale"].to(torch.float32))
        return (values * step).t()


NVFP4_KIND = register_kind(Nvfp4Kind())
