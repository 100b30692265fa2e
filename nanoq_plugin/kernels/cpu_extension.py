"""Build and load one of the `nano_cpu::` C++ extensions (csrc/) on first use, cached by torch per machine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.utils import cpp_extension

from .cpu_isa import CpuFeatures, cpu_features, detect

CSRC = Path(__file__).parent / "csrc"
# The compiler flags of each vector ISA a kernel is built for (cpu_isa.CpuFeatures names them).
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DNANO_ISA_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DNANO_ISA_AVX2"],
}
_loaded: dict[str, str] = {}  # library name -> '' (loaded in this process) or why it could not be


def missing_isa(need: str, features: CpuFeatures | None = None) -> str:
    """'' if `features` (default: this CPU under the `NANOQ_CPU_ISA` cap) have `need`, a `CpuFeatures` flag
    ('avx2', 'avx512', 'avx512_vnni', 'avx512_bf16'), else why not. Kernels ask it on every `can_implement`: a
    library loaded once stays loaded, but a cap set later must still be obeyed."""
    features = features or cpu_features()
    if getattr(features, need):
        return ""
    name = need.upper().replace("AVX512_", "AVX-512 ").replace("AVX512", "AVX-512")
    return f"needs {name} (this CPU: {features.describe()})"


def build_cpu_extension(name: str, source: str, isa: str, flags: tuple[str, ...] = (),
                        fakes: Mapping[str, Callable] | None = None) -> str:
    """Compile `csrc/<source>` for `isa` ('avx512' or 'avx2', plus `flags`) into the library `name`, load its ops
    and register `fakes` (op name -> shape function for torch.compile), once per process (torch caches the build
    in `TORCH_EXTENSIONS_DIR`); '' on success, else a one-line reason (the hardware lacks the ISA; no compiler;
    no ninja; a failed build). The hardware decides, not the cap: whether a kernel runs is `missing_isa`'s
    question, asked every time."""
    if name not in _loaded:
        _loaded[name] = missing_isa(isa, detect()) or _compile(name, source, isa, flags)
        if not _loaded[name]:
            for op, fake in (fakes or {}).items():
                torch.library.register_fake(f"nano_cpu::{op}")(fake)
    return _loaded[name]


def _compile(name: str, source: str, isa: str, flags: tuple[str, ...]) -> str:
    try:  # -fopenmp: ATen's parallel_for is inline, and without it compiles to one thread
        cpp_extension.load(name=name, sources=[str(CSRC / source)],
                           extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS[isa], *flags],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # the caller's kernel says why it cannot run, and the reference runs instead
        return f"its C++ extension did not build ({type(error).__name__}: {str(error).strip().splitlines()[-1]})"
    return ""
