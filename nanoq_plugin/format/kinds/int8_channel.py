"""Kind `int8_channel` (schemes `int8` and `int8-a8`): 8-bit codes, one symmetric scale per output channel.

    qweight int8 [K, N] in [-127, 127]     scales float16 [N]      W[n, k] = q[k, n] * s[n]

`int8-a8` stores the same tensors; its layers also quantize their input per token at run time
(format.activations is that spec).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import NanoqError
from ..tensor_spec import Sharding, TensorSpec, row_steps
from .base import Scheme, SchemeKind, register_kind

if TYPE_CHECKING:
    import torch


class Int8ChannelKind(SchemeKind):
    value = "int8_channel"
    grammar = "int8, int8-a8"
    int8_activations = True

    def parse(self, name: str) -> Scheme | None:
        if name in ("int8", "w8"):
            return Scheme(self, bits=8)
        if name in ("int8-a8", "w8a8"):
            return Scheme(self, bits=8, activation_bits=8)
        return None

    def validate(self, scheme: Scheme) -> None:
        if scheme.bits != 8 or scheme.group_size is not None or not scheme.symmetric:
            raise NanoqError("scheme int8 is per output channel, symmetric, 8 bits: no group size or zero point")

    def scheme_name(self, scheme: Scheme) -> str:
        return "int8-a8" if scheme.quantizes_activations else "int8"

    def fields_to_dict(self, scheme: Scheme) -> dict:
        return {"bits": scheme.bits}

    def from_dict(self, data: dict, activation_bits: int) -> Scheme:
        return Scheme(self, bits=int(data.get("bits", 8)), activation_bits=activation_bits)

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        import torch

        return {"qweight": TensorSpec((in_features, out_features), torch.int8),
                "scales": TensorSpec((out_features,), torch.float16, Sharding.OUTPUT)}

    def encode(self, weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor) -> torch.Tensor:
        """Codes int8 `[K, N]` of `weight [N, K]` rounded with `scales [N]` as stored (float16), some inputs at
        a time (`row_steps`)."""
        import torch

        n, k = weight.shape
        s = scales.to(torch.float16).to(torch.float32).view(1, -1)
        s = torch.where(s == 0, torch.ones_like(s), s)
        codes = torch.empty((k, n), dtype=torch.int8, device=weight.device)
        for start, end in row_steps(k, n):
            codes[start:end] = torch.clamp(torch.round(weight[:, start:end].t().to(torch.float32) / s), -127, 127)
        return codes

    def compress(self, weight: torch.Tensor, scheme: Scheme, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        import torch

        n = weight.shape[0]
        return {"qweight": self.encode(weight, scheme, scales).contiguous(),
                "scales": scales.to(torch.float16).reshape(n).contiguous()}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                   in_features: int) -> torch.Tensor:
        import torch

        codes, scales = tensors["qweight"], tensors["scales"].to(torch.float32).view(1, -1)
        out = torch.empty((in_features, out_features), dtype=torch.float32, device=codes.device)
        for start, end in row_steps(in_features, out_features):  # some inputs at a time
            out[start:end] = codes[start:end].to(torch.float32) * scales
        return out.t()


INT8_CHANNEL_KIND = register_kind(Int8ChannelKind())
