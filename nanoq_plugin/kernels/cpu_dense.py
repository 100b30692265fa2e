"""Many-row CPU GEMMs on weights expanded to the activation dtype in a per-thread scratch buffer.

PyTorch's weight-only CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) cost a fixed time
per activation row: measured here (one core, AVX-512 with BF16, SmolLM2 shapes) they are fastest up to
~12 rows (decode), and 2.5-4x slower than oneDNN's bf16 GEMM from 64 rows on (prefill). For many rows the
weight is expanded `[rows_chunk, K]` at a time into a reused buffer and multiplied there: the expansion is
one pass over the weight, paid once per call whatever the number of rows. The buffer holds at most
`SCRATCH_ELEMENTS` values (a larger weight, an LM head, is done in row chunks), so a model's weights are never
held twice; it is per thread because the buffer is overwritten by every call.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

# Rows at which the expanded path overtakes the per-row kernels (benchmarks/kernels.py measures both).
DENSE_MIN_ROWS = 12
INT4_DENSE_MIN_ROWS = 64  # the 4-bit expansion (unpack, reorder, scale) costs ~4x the int8 one
# The codebook kernel's dense path in float32 (CPUs without native bfloat16): the float32 GEMM on the expanded
# weight overtakes the direct path later, at 32-64 rows (measured with the AVX2 build, 2048x6144 and 4096x4096).
FLOAT32_DENSE_MIN_ROWS = 48
SCRATCH_ELEMENTS = 1 << 22  # 8 MiB of bf16: every linear of a small model in one chunk, an LM head in ~7

_local = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A `[rows, cols]` tensor of `dtype` viewing this thread's scratch buffer (contents undefined)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buffer[: rows * cols].view(rows, cols)


def chunked_matmul(x: torch.Tensor, out_features: int, expand: Callable[[int, int, torch.Tensor], torch.Tensor],
                   row_multiple: int = 1) -> torch.Tensor:
    """`x [M, K] @ W.T -> [M, N]` in x.dtype, where `expand(n0, n1, buffer)` writes weight rows `W[n0:n1]` in
    x.dtype into `buffer [n1 - n0, K]` and returns it; chunk bounds are multiples of `row_multiple`."""
    rows, k = x.shape
    step = max(row_multiple, min(out_features, SCRATCH_ELEMENTS // k) // row_multiple * row_multiple)
    if step >= out_features:
        return torch.mm(x, expand(0, out_features, scratch(out_features, k, x.dtype)).t())
    out = torch.empty(rows, out_features, dtype=x.dtype)
    for n0 in range(0, out_features, step):
        n1 = min(out_features, n0 + step)
        out[:, n0:n1] = torch.mm(x, expand(n0, n1, scratch(n1 - n0, k, x.dtype)).t())
    return out
