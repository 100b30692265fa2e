"""What the kinds with groups along the input dimension share: the group-size rule and packed-code shapes."""

from __future__ import annotations

from ...errors import NanoqError

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
