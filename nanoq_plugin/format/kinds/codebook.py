"""Kind `codebook` (schemes `cb{2,3,4}g{32,64,128}`): the inputs are rotated per group (a randomized Hadamard,
format.hadamard), and the codes index 2**b learned levels, one scale per group. Weight `W [N, K]`:

    qweight int32 [K*b/32, N] (packed as int_group)   scales float16 [K/G, N]   codebook float32 [2**b]
    signs int8 [K] (the rotation R)
    W' [n, k] = c[q[k, n]] * s[k // G, n]        W = W' R  (format.hadamard.unrotate_weight)

Kernels multiply rotated activations `R x` by `W'`, so they read qweight, scales and codebook; the rotation is
the caller's (`input_rotation`). The levels are fitted by quantizers.codebook (Lloyd-Max).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...errors import NanoqError
from ..tensor_spec import Sharding, TensorSpec, expand_groups
from .base import Scheme, register_kind

if TYPE_CHECKING:
    import torch
from .grouped import ALLOWED_GROUP_SIZES, GroupedKind

CODEBOOK_BITS = (2, 3, 4)
_NAME = re.compile(r"^cb(\d+)g(\d+)$")


class CodebookKind(GroupedKind):
    value = "codebook"
    grammar = "cb{2,3,4}g{32,64,128}"
    gathers_rows = False  # its linears' kernels only; a table is stored as int8 / int4gG

    def parse(self, name: str) -> Scheme | None:
        match = _NAME.match(name)
        return Scheme(self, int(match.group(1)), int(match.group(2))) if match else None

    def validate(self, scheme: Scheme) -> None:
        if scheme.bits not in CODEBOOK_BITS or scheme.group_size not in ALLOWED_GROUP_SIZES or not scheme.symmetric:
            raise NanoqError(f"codebook scheme needs bits in {CODEBOOK_BITS} and a group size in "
                             f"{sorted(ALLOWED_GROUP_SIZES)}")

    def scheme_name(self, scheme: Scheme) -> str:
        return f"cb{scheme.bits}g{scheme.group_size}"

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        import torch

        return {**self.packed_specs(scheme, out_features, in_features),
                "codebook": TensorSpec((1 << scheme.bits,), torch.float32, Sharding.PART_TABLE),
                "signs": TensorSpec((in_features,), torch.int8, Sharding.INPUT)}

    def kernel_tensors(self, scheme: Scheme) -> tuple[str, ...]:
        return ("qweight", "scales", "codebook")

    def compress(self, weight, scheme, scales, zeros=None):
        raise NanoqError("codebook schemes are encoded by quantizers.codebook.compress_codebook")

    def input_rotation(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme):
        return tensors["signs"], scheme.group_size

    def kernel_weight(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                      in_features: int) -> torch.Tensor:
        """The rotated weight `W' [N, K]` float32: levels of the codes times group scales."""
        import torch

        from ..packing import unpack_codes

        codes = unpack_codes(tensors["qweight"], scheme.bits).long()  # [K, N]
        levels = tensors["codebook"].to(torch.float32)[codes]
        return (levels * expand_groups(tensors["scales"].to(torch.float32), scheme.group_size)).t()

    def dequantize(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                   in_features: int) -> torch.Tensor:
        from ..hadamard import unrotate_weight

        return unrotate_weight(self.kernel_weight(tensors, scheme, out_features, in_features), tensors["signs"],
                               scheme.group_size)


CODEBOOK_KIND = register_kind(CodebookKind())
