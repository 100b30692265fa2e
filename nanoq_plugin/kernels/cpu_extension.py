"""Build and load one of the `nano_cpu::` C++ extensions (csrc/) on first use, cached by torch per machine."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).parent / "csrc"


def build_cpu_extension(name: str, source: str, flags: list[str]) -> str:
    """Compile `csrc/<source>` with `flags` into the library `name` and load its ops (torch caches the build
    in `TORCH_EXTENSIONS_DIR`); '' on success, else a one-line reason (no AVX-512, no compiler, no ninja, a
    failed build)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"needs AVX-512 (this CPU: {capability})"
    try:  # -fopenmp: ATen's parallel_for is inline, and without it compiles to one thread
        cpp_extension.load(name=name, sources=[str(CSRC / source)], extra_cflags=["-O3", "-fopenmp", *flags],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # the caller's kernel says why it cannot run, and the reference runs instead
        return f"its C++ extension did not build ({type(error).__name__}: {str(error).strip().splitlines()[-1]})"
    return ""
