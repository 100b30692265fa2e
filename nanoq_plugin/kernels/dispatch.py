"""Choose the kernel for a layer: the first in the device's priority list that can run it."""

from __future__ import annotations

from ..errors import NanoqError
from .base import LinearConfig, LinearKernel
from .cpu_codebook import CpuCodebookKernel
from .cpu_int4 import CpuInt4GroupKernel
from .cpu_int8 import CpuInt8ChannelKernel
from .cpu_int8_simd import CpuInt8Bf16Kernel, CpuInt8DynamicKernel
from .reference_linear import ReferenceKernel
from .triton_linear import TritonKernel

PRIORITY: dict[str, tuple[LinearKernel, ...]] = {
    "cuda": (TritonKernel(), ReferenceKernel()),
    "cpu": (CpuInt8DynamicKernel(), CpuInt8Bf16Kernel(), CpuInt8ChannelKernel(), CpuInt4GroupKernel(),
            CpuCodebookKernel(), ReferenceKernel()),
}
KERNELS: dict[str, LinearKernel] = {k.name: k for kernels in PRIORITY.values() for k in kernels}


def select_kernel(config: LinearConfig, needs_gather: bool = False, where: str = "layer") -> LinearKernel:
    """The fastest kernel that runs `config` (and can look up embedding rows if `needs_gather`).

    Raises NanoqError listing every kernel's reason when none fits.
    """
    reasons = []
    for kernel in PRIORITY.get(config.device_type, (ReferenceKernel(),)):
        ok, why = kernel.can_implement(config)
        if ok and needs_gather and not kernel.supports_gather:
            ok, why = False, "cannot look up embedding rows"
        if ok:
            return kernel
        reasons.append(f"{kernel.name}: {why}")
    raise NanoqError(f"{where}: no kernel runs scheme {config.scheme.name} on {config.device_type} "
                     f"({'; '.join(reasons)})")
