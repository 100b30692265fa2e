"""What the kinds with groups along the input dimension share: the group-size rule and packed-code shapes."""

from __future__ import annotations

from ...errors import NanoqError
from ..tensor_spec import TensorSpec
from .base import Scheme, SchemeKind

ALLOWED_GROUP_SIZES = (128, 64, 32)  # largest first: the order of the group-size fallback


def check_groups_fit(group_size: int, in_features: int, where: str) -> None:
    """Raise NanoqError unless groups of `group_size` tile `in_features` and the codes pack (multiples of 32)."""
    if in_features % group_size:
        fits = [g for g in ALLOWED_GROUP_SIZES if in_features % g == 0]
        hint = f"choose group size {' or '.join(map(str, fits))}" if fits else "keep it in float"
        raise NanoqError(f"{where}: group size {group_size} does not divide input dim {in_features} ({hint})")
    from ..packing import PACK_BLOCK  # imports torch: only when a shape is checked

    if in_features % PACK_BLOCK:
        raise NanoqError(f"{where}: input dim {in_features} must be a multiple of {PACK_BLOCK} to pack codes")


class GroupedKind(SchemeKind):
    """A kind whose codes are packed along K (format.packing) with one float16 scale per group of G inputs."""

    def check_shape_fits(self, scheme: Scheme, out_features: int, in_features: int, where: str) -> None:
        check_groups_fit(scheme.group_size, in_features, where)

    def input_block(self, scheme: Scheme) -> int:
        return scheme.group_size

    def packed_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """`qweight` int32 `[K*b/32, N]` and `scales` float16 `[K/G, N]`, after checking the shape fits."""
        import torch

        from ..packing import packed_rows

        self.check_shape_fits(scheme, out_features, in_features, "linear")
        return {"qweight": TensorSpec((packed_rows(in_features, scheme.bits), out_features), torch.int32),
                "scales": TensorSpec((in_features // scheme.group_size, out_features), torch.float16)}
