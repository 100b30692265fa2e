"""What a packed tensor is: a validated, named scheme.

Grammar of a scheme name (case-insensitive, surrounding spaces ignored), one line per built-in kind
(format.kinds; a registered kind adds its own names):

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

from functools import lru_cache

from ..errors import NanoqError
from .kinds import Scheme, SchemeKind, registered_kinds
from .kinds.codebook import CODEBOOK_BITS, CODEBOOK_KIND
from .kinds.float_kind import FLOAT_KIND
from .kinds.grouped import ALLOWED_GROUP_SIZES
from .kinds.int8_channel import INT8_CHANNEL_KIND
from .kinds.int_group import ALLOWED_BITS, INT_GROUP_KIND
from .kinds.nvfp4 import NVFP4_GROUP_SIZE, NVFP4_KIND

__all__ = ["ALLOWED_BITS", "ALLOWED_GROUP_SIZES", "CODEBOOK_BITS", "FLOAT", "INT8_CHANNEL", "INT8_DYNAMIC_A8",
           "NVFP4", "NVFP4_GROUP_SIZE", "Scheme", "SchemeKind", "parse_scheme", "scheme_grammar"]


# The built-in kinds as attributes of the kinds' base class, so that `scheme.kind is SchemeKind.INT_GROUP` reads
# plainly where a kernel or quantizer supports some kinds only. Format-specific behaviour belongs in the kind.
SchemeKind.FLOAT = FLOAT_KIND
SchemeKind.INT8_CHANNEL = INT8_CHANNEL_KIND
SchemeKind.INT_GROUP = INT_GROUP_KIND
SchemeKind.NVFP4 = NVFP4_KIND
SchemeKind.CODEBOOK = CODEBOOK_KIND

FLOAT = Scheme(FLOAT_KIND)
INT8_CHANNEL = Scheme(INT8_CHANNEL_KIND, bits=8)
INT8_DYNAMIC_A8 = Scheme(INT8_CHANNEL_KIND, bits=8, activation_bits=8)
NVFP4 = Scheme(NVFP4_KIND, bits=4, group_size=NVFP4_GROUP_SIZE)
_CANONICAL = {scheme: scheme for scheme in (FLOAT, INT8_CHANNEL, INT8_DYNAMIC_A8, NVFP4)}  # parse returns these


def scheme_grammar() -> str:
    """Every scheme name form of the registered kinds, for error messages."""
    forms = [kind.grammar for kind in registered_kinds()]
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"


@lru_cache(maxsize=256)
def _parse(name: str, kinds: tuple) -> Scheme:
    for kind in kinds:
        try:
            scheme = kind.parse(name)
        except NanoqError as err:
            raise NanoqError(f"unknown scheme {name!r}: {err} (valid: {scheme_grammar()})") from None
        if scheme is not None:
            return _CANONICAL.get(scheme, scheme)
    raise NanoqError(f"unknown scheme {name!r} (valid: {scheme_grammar()})")


def parse_scheme(text: str) -> Scheme:
    """Parse a scheme name (grammar in the module docstring and the registered kinds); raises NanoqError
    listing the valid forms. Custom ops call it on `scheme.name` per call: results are cached."""
    name = str(text).strip().lower()
    try:
        return _parse(name, registered_kinds())
    except NanoqError as err:
        raise NanoqError(str(err).replace(repr(name), repr(text), 1)) from None
