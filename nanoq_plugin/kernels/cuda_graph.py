"""Capture repeated calls in a CUDA graph: how tuning and benchmarks time GPU work without Python's launch
overhead (which at decode sizes is longer than the kernels themselves)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_calls(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` back-to-back calls of `fn()`. `fn` runs once on a side stream first (capture
    needs its allocations and lazy initialization done); compile it before (one plain call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph
