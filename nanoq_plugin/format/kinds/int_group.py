"""Kind `int_group` (schemes `int{2,3,4,8}g{32,64,128}` and their `-asym` forms): integer codes, one scale per
group of G inputs, symmetric or with an integer zero point per group. Weight `W [N, K]`:

    qweight int32 [K*b/32, N]  (format.packing)   scales float16 [K/G, N]   zeros uint8 [K/G, N] (asym only)
    W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]      z = 2**(b-1) when symmetric
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import NanoqError
from ..tensor_spec import TensorSpec, expand_groups, row_steps
from .base import Scheme, register_kind

if TYPE_CHECKING:
    import torch
from .grouped import ALLOWED_GROUP_SIZES, GroupedKind

ALLOWED_BITS = (2, 3, 4, 8)
_NAME = re.compile(r"^int(\d+)g(\d+)(-asym|-sym)?$")


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of a symmetric `bits`-bit group scheme."""
    return 1 << (bits - 1)


class IntGroupKind(GroupedKind):
    value = "int_group"
    grammar = "int{2,3,4,8}g{32,64,128}, int{2,3,4,8}g{32,64,128}-asym"

    def parse(self, name: str) -> Scheme | None:
        match = _NAME.match(name)
        if not match:
            return None
        return Scheme(self, int(match.group(1)), int(match.group(2)), symmetric=match.group(3) != "-asym")

    def validate(self, scheme: Scheme) -> None:
        if scheme.bits not in ALLOWED_BITS:
            raise NanoqError(f"scheme bits {scheme.bits} is not supported (allowed: {ALLOWED_BITS})")
        if scheme.group_size not in ALLOWED_GROUP_SIZES:
            raise NanoqError(f"scheme group size {scheme.group_size} is not supported "
                             f"(allowed: {sorted(ALLOWED_GROUP_SIZES)})")

    def scheme_name(self, scheme: Scheme) -> str:
        return f"int{scheme.bits}g{scheme.group_size}" + ("" if scheme.symmetric else "-asym")

    def fields_to_dict(self, scheme: Scheme) -> dict:
        return {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric}

    def from_dict(self, data: dict, activation_bits: int) -> Scheme:
        return Scheme(self, int(data["bits"]), int(data["group_size"]), bool(data.get("symmetric", True)),
                      activation_bits)

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        import torch

        specs = self.packed_specs(scheme, out_features, in_features)
        if not scheme.symmetric:
            specs["zeros"] = TensorSpec(specs["scales"].shape, torch.uint8)
        return specs

    def kernel_tensors(self, scheme: Scheme) -> tuple[str, ...]:
        return ("qweight", "scales") if scheme.symmetric else ("qweight", "scales", "zeros")

    def encode(self, weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor,
               zeros: torch.Tensor | None = None) -> torch.Tensor:
        """Codes uint8 `[K, N]` of `weight [N, K]` rounded with `scales [K/G, N]` as stored (float16) and
        `zeros` uint8 `[K/G, N]` (None when symmetric), a few groups of inputs at a time (`row_steps`)."""
        import torch

        n, k = weight.shape
        g = scheme.group_size
        s = scales.to(torch.float16).to(torch.float32)
        s = torch.where(s == 0, torch.ones_like(s), s)
        codes = torch.empty((k, n), dtype=torch.uint8, device=weight.device)
        for start, end in row_steps(k, n, g):
            groups = slice(start // g, end // g)
            z = (symmetric_zero(scheme.bits) if zeros is None
                 else expand_groups(zeros[groups].to(torch.float32), g))
            q = torch.round(weight[:, start:end].t().to(torch.float32) / expand_groups(s[groups], g)) + z
            codes[start:end] = torch.clamp(q, 0, (1 << scheme.bits) - 1)
        return codes

    def compress(self, weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if scheme.symmetric != (zeros is None):
            raise NanoqError(f"scheme {scheme.name}: zeros must be given exactly when the scheme is asymmetric")
        import torch

        from ..packing import pack_codes

        n, k = weight.shape
        g, bits = scheme.group_size, scheme.bits
        qweight = torch.empty((k * bits // 32, n), dtype=torch.int32, device=weight.device)
        # encoded and packed a few groups of inputs at a time: the whole uint8 codes of an 8B embedding table
        # would be 0.5 GB (group sizes are multiples of the 32-row packing block)
        for start, end in row_steps(k, n, g):
            groups = slice(start // g, end // g)
            codes = self.encode(weight[:, start:end], scheme, scales[groups], None if zeros is None else zeros[groups])
            qweight[start * bits // 32:end * bits // 32] = pack_codes(codes, bits)
        out = {"qweight": qweight, "scales": scales.to(torch.float16).contiguous()}
        if zeros is not None:
            out["zeros"] = zeros.to(torch.uint8).contiguous()
        return out

    def dequantize(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                   in_features: int) -> torch.Tensor:
        import torch

        from ..packing import unpack_codes

        g = scheme.group_size
        codes = unpack_codes(tensors["qweight"], scheme.bits)
        scales = tensors["scales"]
        out = torch.empty((in_features, out_features), dtype=torch.float32, device=codes.device)
        for start, end in row_steps(in_features, out_features, g):  # a few groups of inputs at a time
            groups = slice(start // g, end // g)
            step = codes[start:end].view(-1, g, out_features).to(torch.float32)
            if scheme.symmetric:
                centered = step - float(symmetric_zero(scheme.bits))
            else:
                centered = step - tensors["zeros"][groups].to(torch.float32).unsqueeze(1)
            out[start:end] = (centered * scales[groups].to(torch.float32).unsqueeze(1)).view(end - start, out_features)
        return out.t()


INT_GROUP_KIND = register_kind(IntGroupKind())
