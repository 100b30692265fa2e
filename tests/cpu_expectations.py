"""Which CPU kernel a layer must get on this machine: the tests' oracle, written out from each kernel's documented
requirements and kept apart from `kernels.dispatch` (whose choice it checks).

`cpu_features()` is the capped view (`NANOQ_CPU_ISA`), which dispatch follows; `detect()` is the hardware,
which decides what the kernel tests can run directly.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from nanoq_plugin.format.schemes import Scheme, SchemeKind
from nanoq_plugin.kernels.cpu_isa import CpuFeatures, cpu_features, detect

EXERCISED: Counter[str] = Counter()  # kernel name -> `apply` calls this session (conftest.record_exercised_kernels)

# Every CPU kernel of ours, with the instruction set it needs (`CpuFeatures` attribute).
OUR_CPU_KERNELS = {
    "cpu_int8_vnni": "avx512_vnni",
    "cpu_int8_avx2": "avx2",
    "cpu_int8_bf16dot": "avx512_bf16",
    "cpu_int8_wo_avx2": "avx2",
    "cpu_int4_avx2": "avx2",
    "cpu_codebook": "avx512",
    "cpu_codebook_avx2": "avx2",
}


def expected_cpu_kernel(scheme: Scheme, act_dtype: torch.dtype, features: CpuFeatures | None = None) -> str:
    """The kernel dispatch must pick for a layer of `scheme` whose shape every kernel takes (N a multiple of 64,
    K a multiple of the group size and of 4, G in 32..256) on a CPU with `features` (default: this one, capped)."""
    f = features or cpu_features()
    sixteen_bit = act_dtype in (torch.bfloat16, torch.float16)
    if scheme.kind is SchemeKind.INT8_CHANNEL and scheme.quantizes_activations:
        return "cpu_int8_vnni" if f.avx512_vnni else "cpu_int8_avx2" if f.avx2 else "reference"
    # float32 FMAs where bfloat16 is not native (float32 activations only without AVX-512: MKL wins there)
    ours_fma = f.avx2 and not f.avx512_bf16 and (sixteen_bit or not f.avx512)
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        if act_dtype == torch.bfloat16 and f.avx512_bf16:
            return "cpu_int8_bf16dot"
        if ours_fma:
            return "cpu_int8_wo_avx2"
        return "cpu_int8pack" if sixteen_bit else "reference"  # PyTorch's own kernel, whatever the ISA
    if scheme.kind is SchemeKind.INT_GROUP and scheme.bits <= 4:
        if ours_fma:
            return "cpu_int4_avx2"
        return "cpu_int4pack" if sixteen_bit else "reference"
    if scheme.kind is SchemeKind.CODEBOOK:
        return "cpu_codebook" if f.avx512 else "cpu_codebook_avx2" if f.avx2 else "reference"
    return "reference"


def hardware_has(kernel_name: str) -> bool:
    """True if this CPU itself (whatever the cap) runs `kernel_name`: its direct tests run here (PyTorch's own
    kernels, not in OUR_CPU_KERNELS, run on any CPU)."""
    return kernel_name not in OUR_CPU_KERNELS or bool(getattr(detect(), OUR_CPU_KERNELS[kernel_name]))


def skip_unless_hardware_has(kernel_name: str) -> None:
    if not hardware_has(kernel_name):
        pytest.skip(f"{kernel_name} needs {OUR_CPU_KERNELS[kernel_name]}, which this CPU lacks: {detect().describe()}")


def machine_for(kernel_name: str) -> str | None:
    """The `NANOQ_CPU_ISA` cap under which this hardware stands for a machine that `kernel_name` is chosen on:
    'avx2' for the AVX2 kernels (they step aside on CPUs with native bfloat16), no cap for the others."""
    return "avx2" if OUR_CPU_KERNELS.get(kernel_name) == "avx2" else None


def prepare_with_kernel(kernel_name: str, tensors, scheme, n: int, k: int, dtype, cpu_cap):
    """The layer prepared by one named kernel (not by dispatch), which must take it, with this hardware standing
    for a machine that kernel runs on (`machine_for`; `cpu_cap` is the conftest fixture); skips where the hardware
    cannot run it. A `kernels.ops.PreparedLinear`, so `ops.apply_linear` runs it."""
    from nanoq_plugin.kernels import ops
    from nanoq_plugin.kernels.base import LinearConfig
    from nanoq_plugin.kernels.dispatch import KERNELS

    skip_unless_hardware_has(kernel_name)
    cpu_cap(machine_for(kernel_name))
    kernel, config = KERNELS[kernel_name], LinearConfig(scheme, n, k, dtype, "cpu")
    ok, why = kernel.can_implement(config)
    assert ok, why
    return ops.PreparedLinear(kernel_name, config, kernel.prepare(dict(tensors), config))
