"""The scheme kinds: one module per kind (format.kinds.base says what a kind owns), registered on import in
this order (the order `parse_scheme` tries them and error messages list them)."""

from . import float_kind, int8_channel, int_group, nvfp4, codebook  # noqa: F401,I001  (each registers its kind)
from .base import Scheme, SchemeKind, register_kind, registered_kinds

__all__ = ["Scheme", "SchemeKind", "register_kind", "registered_kinds"]
