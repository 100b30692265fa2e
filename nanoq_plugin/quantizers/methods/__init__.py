"""Quantization methods as strategies: RTN, GPTQ, AWQ and AWQ-then-GPTQ, each one `QuantMethod` registered by
name behind the interface the pipeline's block walk calls (`base`). A new method is one module with a
`QuantMethod` subclass decorated by `register_method`; nothing else needs to change."""

from .base import GroupResult, LinearGroup, QuantMethod
from .registry import calibrated_method_names, get_method, method_names, register_method, unregister_method
from . import rtn, gptq, awq  # noqa: E402,F401,I001  (the built-ins register on import, in the order --method lists them)

__all__ = ["GroupResult", "LinearGroup", "QuantMethod", "calibrated_method_names", "get_method", "method_names",
           "register_method", "unregister_method"]
