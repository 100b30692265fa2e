"""The quantization methods by name: the one place that says which exist (the command line's `--method`
choices, a recipe's `method`, which methods need calibration text)."""

from __future__ import annotations

from ...errors import NanoqError
from .base import QuantMethod

_METHODS: dict[str, QuantMethod] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    """Register one instance of the `QuantMethod` subclass `cls` under `cls.name` (a class decorator)."""
    method = cls()
    if method.name in _METHODS:
        raise NanoqError(f"method {method.name!r} is registered already (by {type(_METHODS[method.name]).__name__})")
    _METHODS[method.name] = method
    return cls


def unregister_method(name: str) -> None:
    """Remove the method registered as `name` (tests that register their own)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in the order they were registered."""
    return tuple(_METHODS)


def calibrated_method_names() -> tuple[str, ...]:
    """The registered methods that need calibration text."""
    return tuple(name for name, method in _METHODS.items() if method.needs_calibration)


def get_method(name: str) -> QuantMethod:
    """The method registered as `name`; NanoqError listing the available ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise NanoqError(f"method {name!r} is not available (available: {', '.join(_METHODS)})") from None
