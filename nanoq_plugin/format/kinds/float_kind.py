"""Kind `float`: the module keeps its ordinary `P.weight` in the stored float dtype; nothing is packed."""

from __future__ import annotations

from ...errors import NanoqError
from .base import Scheme, SchemeKind, register_kind

ALIASES = ("float", "fp16", "bf16", "none")


class FloatKind(SchemeKind):
    value = "float"
    grammar = "float"
    quantized = False

    def parse(self, name: str) -> Scheme | None:
        return Scheme(self) if name in ALIASES else None

    def validate(self, scheme: Scheme) -> None:
        if scheme.group_size is not None:
            raise NanoqError("scheme float takes no group size")

    def scheme_name(self, scheme: Scheme) -> str:
        return "float"

    def fields_to_dict(self, scheme: Scheme) -> dict:
        return {}

    def from_dict(self, data: dict, activation_bits: int) -> Scheme:
        return Scheme(self, activation_bits=activation_bits)

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict:
        return {}

    def kernel_tensors(self, scheme: Scheme) -> tuple[str, ...]:
        return ()


FLOAT_KIND = register_kind(FloatKind())
