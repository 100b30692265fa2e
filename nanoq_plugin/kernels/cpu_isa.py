"""What this CPU can run: the instruction sets that select a CPU kernel, read once per process.

The kernels ask `cpu_features()` (never torch or cpuid directly), so one place decides, and one environment
variable caps what the dispatcher believes in: `NANOQ_CPU_ISA=avx2` makes an AVX-512 machine choose the
AVX2 kernels, so every kernel family is tested and timed on whatever CPU a developer or CI has.

    NANOQ_CPU_ISA   what remains            a machine that has exactly that
    (unset)/native  everything detected
    avx512_vnni     AVX-512 F/BW/VL/DQ+VNNI  Cascade Lake, Ice Lake (no AVX-512 BF16)
    avx512          AVX-512 F/BW/VL/DQ      Skylake-SP (no VNNI, no BF16)
    avx2            AVX2 + FMA + F16C       Zen 2/3, Haswell-Broadwell
    none            nothing                 aarch64 and older x86: the reference kernels

A cap only removes instructions: asking for one the CPU lacks is refused (it would crash the process).
The flags come from the kernel's cpuinfo (Linux, x86) and fall back to torch's own probes elsewhere.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field, replace

import torch

from ..errors import NanoqError

ENV_CAP = "NANOQ_CPU_ISA"
# cpuinfo flag -> our name; AVX-512 counts as present only with all four of F/BW/VL/DQ (every kernel needs them)
AVX512_BASE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
CAPS = ("native", "avx512_vnni", "avx512", "avx2", "none")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets a kernel may be chosen by (after the `NANOQ_CPU_ISA` cap)."""

    model: str
    avx2: bool = False        # with FMA and F16C, as every AVX2 CPU since Haswell has
    avx512: bool = False      # F + BW + VL + DQ
    avx512_vnni: bool = False  # vpdpbusd on 512-bit registers
    avx512_bf16: bool = False  # vdpbf16ps
    avx_vnni: bool = False    # vpdpbusd on 256-bit registers (VEX; Alder Lake, Zen 5)
    amx: bool = False         # AMX tiles (Sapphire Rapids): no kernel of ours uses them yet
    cap: str = "native"
    flags: tuple[str, ...] = field(default=(), repr=False)  # every flag that selects a kernel, for result files

    @property
    def best_isa(self) -> str:
        """The widest vector ISA the kernels may use: 'avx512', 'avx2' or 'none'."""
        return "avx512" if self.avx512 else "avx2" if self.avx2 else "none"

    @property
    def label(self) -> str:
        """A file-name-safe summary of the kernel-selecting ISA: 'avx512-vnni-bf16', 'avx512', 'avx2', 'none'."""
        extras = [name for name, present in (("vnni", self.avx512_vnni), ("bf16", self.avx512_bf16)) if present]
        return "-".join([self.best_isa, *extras])

    def describe(self) -> str:
        """`model (isa: flag flag ...)`, the cap named when one is set."""
        names = [name for name in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx")
                 if getattr(self, name)]
        capped = f", capped by {ENV_CAP}={self.cap}" if self.cap != "native" else ""
        return f"{self.model} ({' '.join(names) or 'no SIMD kernel ISA'}{capped})"


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ('', set()) where there is none."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return model, flags


def detect() -> CpuFeatures:
    """Every kernel-selecting instruction set this CPU has (no cap)."""
    model, flags = _cpuinfo()
    model = model or platform.processor() or platform.machine()
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return CpuFeatures(model=model)
    if not flags:  # no cpuinfo (not Linux): torch's probes
        capability = torch.backends.cpu.get_cpu_capability()
        avx512 = "AVX512" in capability
        return CpuFeatures(model=model, avx2=avx512 or "AVX2" in capability, avx512=avx512,
                           avx512_vnni=avx512 and torch.cpu._is_vnni_supported(),
                           avx512_bf16=avx512 and torch.cpu._is_avx512_bf16_supported())
    avx512 = all(flag in flags for flag in AVX512_BASE)
    selecting = sorted(flags & {"avx2", "fma", "f16c", *AVX512_BASE, "avx512_vnni", "avx512_bf16", "avx_vnni",
                                "amx_tile", "amx_int8", "amx_bf16"})
    return CpuFeatures(
        model=model,
        avx2={"avx2", "fma", "f16c"} <= flags,
        avx512=avx512,
        avx512_vnni=avx512 and "avx512_vnni" in flags,
        avx512_bf16=avx512 and "avx512_bf16" in flags,
        avx_vnni="avx_vnni" in flags,
        amx={"amx_tile", "amx_int8"} <= flags,
        flags=tuple(selecting),
    )


def apply_cap(features: CpuFeatures, cap: str) -> CpuFeatures:
    """`features` with every instruction set above `cap` (one of CAPS) removed; NanoqError for an unknown cap
    or one this CPU does not reach."""
    cap = cap.strip().lower().replace("-", "_") or "native"
    if cap not in CAPS:
        raise NanoqError(f"{ENV_CAP}={cap!r} is not one of {', '.join(CAPS)}")
    if cap == "native":
        return features
    reaches = {"avx512_vnni": features.avx512_vnni, "avx512": features.avx512, "avx2": features.avx2, "none": True}
    if not reaches[cap]:
        raise NanoqError(f"{ENV_CAP}={cap} asks for instructions this CPU lacks: {features.describe()}")
    keep = CAPS.index(cap)  # every cap drops what no machine of that class has: BF16, AVX-VNNI, AMX
    return replace(
        features, cap=cap, amx=False, avx_vnni=False, avx512_bf16=False,
        avx512_vnni=features.avx512_vnni and keep <= CAPS.index("avx512_vnni"),
        avx512=features.avx512 and keep <= CAPS.index("avx512"),
        avx2=features.avx2 and keep <= CAPS.index("avx2"),
    )


@functools.cache
def cpu_features() -> CpuFeatures:
    """This process's CPU features after the `NANOQ_CPU_ISA` cap (read once; `cpu_features.cache_clear()`
    after changing the variable)."""
    return apply_cap(detect(), os.environ.get(ENV_CAP, "native"))
