"""A scheme, the scheme kind that gives it meaning, and the registry of kinds.

A `Scheme` is a value (kind, bits, group size, symmetric, activation bits). Its `kind` is one registered
`SchemeKind` object that owns everything format-specific about it:

- the names it parses and its canonical name; validation; its JSON form in `quantization_config`;
- `param_specs`: the tensors a linear of that kind stores (names, shapes, dtypes, tensor-parallel sharding),
  which is also its storage accounting (`tensor_spec.stored_bytes`);
- `dequantize`: the PyTorch reference (the executable spec kernels are tested against);
- `quantize`: its data-free quantizer (round to nearest on the format's own grid);
- what its kernels take: `kernel_tensors` (the stored tensors a GEMM reads, in the order the `nano::` custom
  ops receive them), `kernel_weight` (the weight those tensors describe) and `input_rotation` (a rotation
  the caller applies to the activations first, for kinds whose codes describe a rotated weight).

Custom ops receive `scheme.name`; `parse_scheme` turns it back into the scheme. A new kind is one module that
subclasses `SchemeKind` and calls `register_kind`: nothing else branches on kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import NanoqError

if TYPE_CHECKING:  # the kinds import torch where they compute: names and validation stay torch-free
    import torch

    from ..tensor_spec import TensorSpec

ACTIVATION_BITS = (8, 16)


@dataclass(frozen=True)
class Scheme:
    """One storage scheme. `bits` is 16 for float; `group_size` is None for kinds without groups.

    `activation_bits` is 16 for weight-only schemes (the input is used as it comes) and 8 for `int8-a8`,
    whose layers quantize their input per token at run time (format.activations is the spec). It changes
    what a layer computes, not what is stored.
    """

    kind: "SchemeKind"
    bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    activation_bits: int = 16

    def __post_init__(self) -> None:
        if self.activation_bits not in ACTIVATION_BITS:
            raise NanoqError(f"activation bits {self.activation_bits} is not supported (allowed: 8, 16)")
        if self.activation_bits == 8 and not self.kind.int8_activations:
            raise NanoqError("int8 activations (a8) need int8 per-channel weights (scheme int8-a8)")
        self.kind.validate(self)

    @property
    def name(self) -> str:
        """The canonical name, e.g. `int4g128`, `int3g64-asym`, `int8`, `float`."""
        return self.kind.scheme_name(self)

    @property
    def is_quantized(self) -> bool:
        return self.kind.quantized

    @property
    def quantizes_activations(self) -> bool:
        """True for `int8-a8`: the layer's input is quantized per token at run time (weight-only otherwise)."""
        return self.activation_bits < 16

    def with_group_size(self, group_size: int) -> "Scheme":
        """The same scheme with another group size (kinds with groups)."""
        return Scheme(self.kind, self.bits, group_size, self.symmetric)

    def to_dict(self) -> dict:
        """The JSON form stored in `quantization_config["schemes"]`; unset fields are left out."""
        out = {"kind": self.kind.value, **self.kind.fields_to_dict(self)}
        if self.quantizes_activations:
            out["activation_bits"] = self.activation_bits
            out["activation_scales"] = "dynamic_per_token"
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "scheme") -> "Scheme":
        """Inverse of `to_dict`; `where` names the file/key in the error message."""
        value = data.get("kind") if isinstance(data, dict) else data
        kind = _KINDS.get(value) if isinstance(value, str) else None
        if kind is None:
            raise NanoqError(f"{where}: unknown scheme kind {value!r} (valid: {', '.join(_KINDS)})")
        try:
            return kind.from_dict(data, int(data.get("activation_bits", 16)))
        except NanoqError as err:
            raise NanoqError(f"{where}: {err}") from None
        except (KeyError, ValueError, TypeError) as err:
            raise NanoqError(f"{where}: malformed scheme {data!r} ({err})") from None


class SchemeKind:
    """The family of a scheme and everything format-specific about it (module docstring).

    Subclasses set `value` (stored under `kind` in `quantization_config`) and `grammar` (the scheme names
    it parses, for error messages) and implement the methods that raise here.
    """

    value: str = ""
    grammar: str = ""
    quantized: bool = True
    int8_activations: bool = False  # whether a scheme of this kind may quantize its input (int8-a8)
    gathers_rows: bool = True  # whether an embedding table may be stored in it (rows looked up by token id)

    def __repr__(self) -> str:
        return f"SchemeKind({self.value!r})"

    # A kind is a registered singleton, compared by identity (`scheme.kind is SchemeKind.INT_GROUP`): a copy or a
    # pickle (engines send configs to worker processes) must come back as the registered object, not a twin.
    def __reduce__(self):
        return registered_kind, (self.value,)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # -- names ------------------------------------------------------------------------------------------
    def parse(self, name: str) -> Scheme | None:
        """The scheme a lower-case, stripped `name` denotes, None when it is not of this kind; NanoqError
        when it is of this kind but invalid (e.g. an unsupported bit width)."""
        raise NotImplementedError

    def validate(self, scheme: Scheme) -> None:
        """Raise NanoqError unless `scheme`'s fields are valid for this kind."""

    def scheme_name(self, scheme: Scheme) -> str:
        raise NotImplementedError

    def fields_to_dict(self, scheme: Scheme) -> dict:
        """The JSON fields besides `kind` (and the activation fields `Scheme.to_dict` adds)."""
        return {"bits": scheme.bits, "group_size": scheme.group_size}

    def from_dict(self, data: dict, activation_bits: int) -> Scheme:
        return Scheme(self, int(data["bits"]), int(data["group_size"]), activation_bits=activation_bits)

    # -- storage ----------------------------------------------------------------------------------------
    def check_shape_fits(self, scheme: Scheme, out_features: int, in_features: int, where: str) -> None:
        """Raise NanoqError naming `where` unless a `[out_features, in_features]` weight can be stored."""

    def input_block(self, scheme: Scheme) -> int:
        """The input rows that belong together (a group): a tensor-parallel split of K must not cut one."""
        return 1

    def param_specs(self, scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """The tensors (name -> spec) stored for one linear of shape `[out_features, in_features]`."""
        raise NotImplementedError

    # -- the reference ----------------------------------------------------------------------------------
    def dequantize(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                   in_features: int) -> torch.Tensor:
        """The weight `[out_features, in_features]` float32 that validated stored `tensors` encode."""
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        """The data-free quantizer: `weight [N, K]` float32 -> stored tensors (`param_specs` names)."""
        raise NanoqError(f"scheme {scheme.name} has no data-free quantizer")

    # -- what kernels take ------------------------------------------------------------------------------
    def kernel_tensors(self, scheme: Scheme) -> tuple[str, ...]:
        """The stored tensors a GEMM reads, in the order the `nano::` custom ops take them."""
        return tuple(self.param_specs(scheme, 1, 1024))

    def input_rotation(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme):
        """`(signs [K], group_size)` of a rotation the caller applies to the activations before the GEMM
        (format.hadamard.rotate_inputs), or None. Then `kernel_weight` is the rotated weight."""
        return None

    def kernel_weight(self, tensors: Mapping[str, torch.Tensor], scheme: Scheme, out_features: int,
                      in_features: int) -> torch.Tensor:
        """The weight `[N, K]` float32 that `kernel_tensors` describe: what the GEMM multiplies the (rotated,
        where `input_rotation` says so) activations by."""
        return self.dequantize(tensors, scheme, out_features, in_features)


_KINDS: dict[str, SchemeKind] = {}


def register_kind(kind: SchemeKind) -> SchemeKind:
    """Make `kind` known to `parse_scheme`, `Scheme.from_dict` and everything that asks them; returns it.
    Registering the same value twice replaces the earlier kind (a reloaded module)."""
    if not kind.value:
        raise ValueError("a scheme kind needs a non-empty `value`")
    _KINDS[kind.value] = kind
    return kind


def registered_kind(value: str) -> SchemeKind:
    """The registered kind stored as `value` (what an unpickled kind resolves to)."""
    from . import float_kind, int8_channel, int_group, nvfp4, codebook  # noqa: F401,I001  (the built-ins register)

    try:
        return _KINDS[value]
    except KeyError:
        raise NanoqError(f"unknown scheme kind {value!r} (valid: {', '.join(_KINDS)})") from None


def registered_kinds() -> tuple[SchemeKind, ...]:
    """Every registered kind, in registration order (the order `parse_scheme` tries them)."""
    return tuple(_KINDS.values())
