"""Choose the kernel for a layer: the first in the device's priority list that can run it.

On the CPU the choice depends on the instruction sets `cpu_isa.cpu_features()` reports. The first layer of each
(scheme, activation dtype, device) logs which kernel it got, once per process. A layer left to the reference
kernel on the CPU — which dequantizes the whole weight on every call — logs one warning line naming the scheme,
the device, every faster kernel's reason and the expected slowdown; `NANOQ_STRICT_KERNELS=1` refuses it instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

from ..errors import NanoqError
from ..messages import user_logger
from ..format.schemes import Scheme
from .base import LinearConfig, LinearKernel
from .cpu_codebook import CpuCodebookKernel
from .cpu_int4 import CpuInt4GroupKernel
from .cpu_int8 import CpuInt8ChannelKernel
from .cpu_int8_simd import CpuInt8Bf16Kernel, CpuInt8DynamicAvx2Kernel, CpuInt8DynamicKernel
from .cpu_isa import cpu_features
from .cpu_weight_only_avx2 import CpuInt4Avx2Kernel, CpuInt8WeightOnlyAvx2Kernel
from .reference_linear import ReferenceKernel
from .triton_linear import TritonKernel

PRIORITY: dict[str, tuple[LinearKernel, ...]] = {
    "cuda": (TritonKernel(), ReferenceKernel()),
    "cpu": (CpuInt8DynamicKernel(), CpuInt8DynamicAvx2Kernel(), CpuInt8Bf16Kernel(), CpuInt8WeightOnlyAvx2Kernel(),
            CpuInt8ChannelKernel(), CpuInt4Avx2Kernel(), CpuInt4GroupKernel(), CpuCodebookKernel("avx512"),
            CpuCodebookKernel("avx2"), ReferenceKernel()),
}
KERNELS: dict[str, LinearKernel] = {k.name: k for kernels in PRIORITY.values() for k in kernels}
STRICT_ENV = "NANOQ_STRICT_KERNELS"
# Measured per layer at one activation row, 2048x2048 to 4096x4096 (benchmarks/results/kernels-cpu-*.json: the
# reference against each scheme's fast kernel on the same CPU); the warning quotes it so that a user knows what
# the fallback costs.
REFERENCE_SLOWDOWN = "measured 50-700x slower per layer at one token than the fast kernels"

_reported: set[tuple[str, str, str]] = set()


def strict_kernels() -> bool:
    """`NANOQ_STRICT_KERNELS` is set (to anything but 0): a layer only the CPU reference runs is refused."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def kernel_logger() -> logging.Logger:
    """The `nanoq.kernels` logger; given a stderr handler (`nanoq: message`) at INFO unless the application
    configured one, since engines set up only their own loggers and a warning nobody sees is a silent fallback."""
    return user_logger("nanoq.kernels")


def _report(config: LinearConfig, kernel: LinearKernel, reasons: list[str], where: str) -> None:
    """Log the kernel chosen for a new (scheme, dtype, device); warn, or refuse under strict mode, when the CPU
    runs the reference."""
    slow = config.device_type == "cpu" and isinstance(kernel, ReferenceKernel)
    if slow and strict_kernels():
        raise NanoqError(f"{where}: scheme {config.scheme.name} has no fast kernel on this CPU "
                         f"({cpu_features().describe()}; {'; '.join(reasons)}) and {STRICT_ENV} is set")
    key = (config.scheme.name, str(config.act_dtype).removeprefix("torch."), config.device_type)
    if key in _reported:
        return
    _reported.add(key)
    device = cpu_features().describe() if config.device_type == "cpu" else config.device_type
    if slow:
        kernel_logger().warning(
            f"warning: scheme {key[0]} ({key[1]} activations) on {device} runs the reference kernel, which "
            f"dequantizes the whole weight on every call: {REFERENCE_SLOWDOWN} (first at {where}; "
            f"{'; '.join(reasons)}). Set {STRICT_ENV}=1 to refuse instead.")
    else:
        kernel_logger().info(f"scheme {key[0]} ({key[1]} activations) on {device}: kernel {kernel.name}")


def select_kernel(config: LinearConfig, needs_gather: bool = False, where: str = "layer") -> LinearKernel:
    """The fastest kernel that runs `config` (and can look up embedding rows if `needs_gather`).

    Raises NanoqError listing every kernel's reason when none fits, or when only the CPU reference fits and
    `NANOQ_STRICT_KERNELS=1`.
    """
    reasons = []
    for kernel in PRIORITY.get(config.device_type, (ReferenceKernel(),)):
        ok, why = kernel.can_implement(config)
        if ok and needs_gather and not kernel.supports_gather:
            ok, why = False, "cannot look up embedding rows"
        if ok:
            _report(config, kernel, reasons, where)
            return kernel
        reasons.append(f"{kernel.name}: {why}")
    raise NanoqError(f"{where}: no kernel runs scheme {config.scheme.name} on {config.device_type} "
                     f"({'; '.join(reasons)})")


def refuse_slow_layers(layers: Iterable[tuple[str, Scheme, int, int, bool]], act_dtype: torch.dtype,
                       device_type: str) -> None:
    """Under `NANOQ_STRICT_KERNELS=1`, raise NanoqError for the first layer `(where, scheme, out, in, is_table)`
    that would run the CPU reference (a table: a kernel that can also look up rows) — before any weight is
    loaded, so that an engine refuses to start in its own process with one line. Without the variable, nothing:
    each layer reports itself when it is prepared."""
    if not strict_kernels():
        return
    for where, scheme, out_features, in_features, is_table in layers:
        select_kernel(LinearConfig(scheme, out_features, in_features, act_dtype, device_type), needs_gather=is_table,
                      where=where)
