"""What a packed tensor is: a validated, named scheme.

Grammar of a scheme name (case-insensitive, surrounding spaces ignored):

    float                      module kept in its stored float dtype
    int8                       8-bit, one symmetric scale per output channel
    int8-a8 (alias w8a8)       int8 weights as above, and the layer's input quantized at run time to int8
                               with one symmetric scale per token (dynamic): an int8 x int8 GEMM
    int{2,3,4,8}g{32,64,128}   group-wise along the input dim, symmetric
    int{2,3,4,8}g{32,64,128}-asym   the same with an integer zero point per group
    nvfp4                      FP4 E2M1 values, an FP8 E4M3 scale per 16 inputs, one float32 global scale
    cb{2,3,4}g{32,64,128}      codebook: inputs rotated per group (randomized Hadamard), 2**b learned levels,
                               one scale per group
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import NanoqError

ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_GROUP_SIZES = (128, 64, 32)  # largest first: the order of the group-size fallback
SCHEME_GRAMMAR = ("float, int8, int8-a8, int{2,3,4,8}g{32,64,128}, int{2,3,4,8}g{32,64,128}-asym, nvfp4 or "
                  "cb{2,3,4}g{32,64,128}")
CODEBOOK_BITS = (2, 3, 4)
NVFP4_GROUP_SIZE = 16

_GROUP_RE = re.compile(r"^int(\d+)g(\d+)(-asym|-sym)?$")
_CODEBOOK_RE = re.compile(r"^cb(\d+)g(\d+)$")


class SchemeKind(str, Enum):
    """The family of a scheme; its value is what `quantization_config` stores under `kind`."""

    FLOAT = "float"
    INT8_CHANNEL = "int8_channel"
    INT_GROUP = "int_group"
    NVFP4 = "nvfp4"
    CODEBOOK = "codebook"


@dataclass(frozen=True)
class Scheme:
    """One storage scheme. `bits` is 16 for float; `group_size` is set only for INT_GROUP.

    `activation_bits` is 16 for weight-only schemes (the input is used as it comes) and 8 for `int8-a8`,
    whose layers quantize their input per token at run time (format.activations is the spec). It changes
    what a layer computes, not what is stored: the stored tensors are those of `int8`.
    """

    kind: SchemeKind
    bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int = 16

    def __post_init__(self) -> None:
        if self.activation_bits not in (8, 16):
            raise NanoqError(f"activation bits {self.activation_bits} is not supported (allowed: 8, 16)")
        if self.activation_bits == 8 and self.kind is not SchemeKind.INT8_CHANNEL:
            raise NanoqError("int8 activations (a8) need int8 per-channel weights (scheme int8-a8)")
        if self.kind is SchemeKind.INT_GROUP:
            if self.bits not in ALLOWED_BITS:
                raise NanoqError(f"scheme bits {self.bits} is not supported (allowed: {ALLOWED_BITS})")
            if self.group_size not in ALLOWED_GROUP_SIZES:
                raise NanoqError(
                    f"scheme group size {self.group_size} is not supported (allowed: {sorted(ALLOWED_GROUP_SIZES)})"
                )
        elif self.kind is SchemeKind.INT8_CHANNEL:
            if self.bits != 8 or self.group_size is not None or not self.symmetric:
                raise NanoqError("scheme int8 is per output channel, symmetric, 8 bits: no group size or zero point")
        elif self.kind is SchemeKind.CODEBOOK:
            if self.bits not in CODEBOOK_BITS or self.group_size not in ALLOWED_GROUP_SIZES or not self.symmetric:
                raise NanoqError(f"codebook scheme needs bits in {CODEBOOK_BITS} and a group size in "
                                 f"{sorted(ALLOWED_GROUP_SIZES)}")
        elif self.kind is SchemeKind.NVFP4:
            if self.bits != 4 or self.group_size != NVFP4_GROUP_SIZE or not self.symmetric:
                raise NanoqError("scheme nvfp4 is 4 bits, symmetric, in groups of 16")
        elif self.group_size is not None:
            raise NanoqError("scheme float takes no group size")

    @property
    def name(self) -> str:
        """The canonical name, e.g. `int4g128`, `int3g64-asym`, `int8`, `float`."""
        if self.kind is SchemeKind.FLOAT:
            return "float"
        if self.kind is SchemeKind.INT8_CHANNEL:
            return "int8-a8" if self.quantizes_activations else "int8"
        if self.kind is SchemeKind.NVFP4:
            return "nvfp4"
        if self.kind is SchemeKind.CODEBOOK:
            return f"cb{self.bits}g{self.group_size}"
        return f"int{self.bits}g{self.group_size}" + ("" if self.symmetric else "-asym")

    @property
    def is_quantized(self) -> bool:
        return self.kind is not SchemeKind.FLOAT

    @property
    def quantizes_activations(self) -> bool:
        """True for `int8-a8`: the layer's input is quantized per token at run time (weight-only otherwise)."""
        return self.activation_bits < 16

    def with_group_size(self, group_size: int) -> "Scheme":
        """The same scheme with another group size (INT_GROUP and CODEBOOK)."""
        return Scheme(self.kind, self.bits, group_size, self.symmetric)

    def to_dict(self) -> dict:
        """The JSON form stored in `quantization_config["schemes"]`; unset fields are left out."""
        out: dict = {"kind": self.kind.value}
        if self.kind is not SchemeKind.FLOAT:
            out["bits"] = self.bits
        if self.kind is SchemeKind.INT_GROUP:
            out["group_size"] = self.group_size
            out["symmetric"] = self.symmetric
        if self.kind in (SchemeKind.NVFP4, SchemeKind.CODEBOOK):
            out["group_size"] = self.group_size
        if self.quantizes_activations:
            out["activation_bits"] = self.activation_bits
            out["activation_scales"] = "dynamic_per_token"
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "scheme") -> "Scheme":
        """Inverse of `to_dict`; `where` names the file/key in the error message."""
        try:
            kind = SchemeKind(data["kind"])
        except (KeyError, ValueError, TypeError):
            valid = ", ".join(k.value for k in SchemeKind)
            raise NanoqError(f"{where}: unknown scheme kind {data.get('kind') if isinstance(data, dict) else data!r} "
                             f"(valid: {valid})") from None
        try:
            activation_bits = int(data.get("activation_bits", 16))
            if kind is SchemeKind.FLOAT:
                return cls(kind, activation_bits=activation_bits)
            if kind is SchemeKind.INT8_CHANNEL:
                return cls(kind, bits=int(data.get("bits", 8)), activation_bits=activation_bits)
            if kind is SchemeKind.NVFP4:
                return cls(kind, int(data.get("bits", 4)), int(data.get("group_size", NVFP4_GROUP_SIZE)),
                           activation_bits=activation_bits)
            if kind is SchemeKind.CODEBOOK:
                return cls(kind, int(data["bits"]), int(data["group_size"]), activation_bits=activation_bits)
            return cls(kind, int(data["bits"]), int(data["group_size"]), bool(data.get("symmetric", True)),
                       activation_bits)
        except NanoqError as err:
            raise NanoqError(f"{where}: {err}") from None
        except (KeyError, ValueError, TypeError) as err:
            raise NanoqError(f"{where}: malformed scheme {data!r} ({err})") from None


FLOAT = Scheme(SchemeKind.FLOAT)
INT8_CHANNEL = Scheme(SchemeKind.INT8_CHANNEL, bits=8)
INT8_DYNAMIC_A8 = Scheme(SchemeKind.INT8_CHANNEL, bits=8, activation_bits=8)
NVFP4 = Scheme(SchemeKind.NVFP4, bits=4, group_size=NVFP4_GROUP_SIZE)


def parse_scheme(text: str) -> Scheme:
    """Parse a scheme name (grammar in the module docstring); raises NanoqError listing the valid forms."""
    name = str(text).strip().lower()
    if name in ("float", "fp16", "bf16", "none"):
        return FLOAT
    if name in ("int8", "w8"):
        return INT8_CHANNEL
    if name in ("int8-a8", "w8a8"):
        return INT8_DYNAMIC_A8
    if name == "nvfp4":
        return NVFP4
    codebook = _CODEBOOK_RE.match(name)
    if codebook:
        try:
            return Scheme(SchemeKind.CODEBOOK, int(codebook.group(1)), int(codebook.group(2)))
        except NanoqError as err:
            raise NanoqError(f"unknown scheme {text!r}: {err} (valid: {SCHEME_GRAMMAR})") from None
    match = _GROUP_RE.match(name)
    if not match:
        raise NanoqError(f"unknown scheme {text!r} (valid: {SCHEME_GRAMMAR})")
    bits, group_size, suffix = int(match.group(1)), int(match.group(2)), match.group(3)
    try:
        return Scheme(SchemeKind.INT_GROUP, bits, group_size, symmetric=suffix != "-asym")
    except NanoqError as err:
        raise NanoqError(f"unknown scheme {text!r}: {err} (valid: {SCHEME_GRAMMAR})") from None
