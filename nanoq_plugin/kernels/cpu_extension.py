"""Build and load one of the `nano_cpu::` C++ extensions (csrc/) on first use, cached by torch per machine."""

from __future__ import annotations

from pathlib import Path

from torch.utils import cpp_extension

from .cpu_isa import cpu_features

CSRC = Path(__file__).parent / "csrc"
# The compiler flags of each vector ISA a kernel is built for (cpu_isa.CpuFeatures names them).
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DNANO_ISA_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DNANO_ISA_AVX2"],
}


def missing_isa(isa: str) -> str:
    """'' if this CPU (under the `NANOQ_CPU_ISA` cap) runs `isa` ('avx512' or 'avx2'), else why not. Asked on every
    `can_implement`: a library loaded once stays loaded, but a cap set later must still be obeyed."""
    features = cpu_features()
    return "" if getattr(features, isa) else f"needs {isa.upper().replace('AVX512', 'AVX-512')} (this CPU: {features.describe()})"


def build_cpu_extension(name: str, source: str, isa: str, flags: tuple[str, ...] = ()) -> str:
    """Compile `csrc/<source>` for `isa` ('avx512' or 'avx2', plus `flags`) into the library `name` and load
    its ops (torch caches the build in `TORCH_EXTENSIONS_DIR`); '' on success, else a one-line reason (the CPU,
    or the `NANOQ_CPU_ISA` cap, lacks the ISA; no compiler; no ninja; a failed build)."""
    why = missing_isa(isa)
    if why:
        return why
    try:  # -fopenmp: ATen's parallel_for is inline, and without it compiles to one thread
        cpp_extension.load(name=name, sources=[str(CSRC / source)],
                           extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS[isa], *flags],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # the caller's kernel says why it cannot run, and the reference runs instead
        return f"its C++ extension did not build ({type(error).__name__}: {str(error).strip().splitlines()[-1]})"
    return ""
