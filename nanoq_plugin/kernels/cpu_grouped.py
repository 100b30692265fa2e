"""Several weights applied to consecutive row ranges of one input in one parallel region over the weights: a MoE
layer's experts at decode, each with a few of the layer's rows (`nano_cpu::grouped_rows_`, csrc/grouped_rows.cpp).

Why: each expert's linear op splits that expert's outputs over the threads in its own parallel region, so a
projection of ~30 active experts waits at ~30 barriers (on shared cores, each for a thread that may have been
descheduled). Here the threads split the experts, each expert's op runs on one thread, and the projection waits
at one barrier. The op called per expert is the kernel's own, so the numerics are exactly `apply`'s. The layer's
combine (`weighted_row_sum`: each row times its routing weight, summed into its token in float32) is one pass
too, where PyTorch's cast, multiply and `index_add_` would each open a region.

A kernel takes part by `row_op(prepared, config, x_dtype, rows) -> RowOp | None`: the single op (and its
arguments after the input) that its `apply` runs for `rows` activation rows of `x_dtype`; None where `apply`
does more than that one op at that size (e.g. expands the weight for a dense GEMM). The op may depend on `rows`
(the int4 kernel runs PyTorch's op at decode and its bfloat16 panel from a few rows on): `ops.apply_grouped`
groups the weights by op.

    op (RowOp.op)                            arguments after x (RowOp.tensors, RowOp.ints, in schema order)
    aten::_weight_int4pack_mm_for_cpu        packed uint8 [N, K/2], group_size, scale_zeros [K/G, N, 2]
    nano_cpu::int4pack_linear_avx512bf16     packed uint8 [N, K/2], scale_zeros bf16 [K/G, N, 2], group_size
    nano_cpu::int4_linear_avx2               packed uint8 [N/16, K, 8], scales, offsets f32 [K/G, N], group_size
    nano_cpu::int8_weight_only_linear_avx2   packed int8 [N/16, K, 16], scales f32 [N]
    nano_cpu::int8_weight_only_linear,       packed int8 [N/16, K/depth, 16, depth], (weight_sums int32 [N],
      int8_dynamic_linear(_avx2)             the VNNI op only), scales f32 [N]

The extension has no vector code of its own (it calls the kernels' ops), so it is built with the AVX2 flags every
CPU of the pool has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cpu_extension import build_cpu_extension

LIBRARY = "nanoq_cpu_grouped_rows"


@dataclass(frozen=True)
class RowOp:
    """One kernel's op for some rows: `torch.ops.<op>(x, ...)` with `tensors` and `ints` in its schema's order."""

    op: str  # "namespace::name" (an overload as "namespace::name.overload")
    tensors: tuple[torch.Tensor, ...]
    ints: tuple[int, ...] = ()


def load_extension() -> str:
    """Build (once per machine) and load `nano_cpu::grouped_rows_`; '' on success, else why not."""
    # -ffp-contract=off: weighted_row_sum's products and sums are rounded one by one, as torch's mul and index_add_
    return build_cpu_extension(LIBRARY, "grouped_rows.cpp", "avx2", flags=("-ffp-contract=off",), fakes={
        "grouped_rows_": _fake_grouped_rows,
        "weighted_row_sum": lambda src, weights, index, targets, dtype: src.new_empty((targets, src.shape[1]),
                                                                                     dtype=dtype)})


def _fake_grouped_rows(out, x, gather, bounds, op, tensors, ints) -> None:
    """It only writes `out`: nothing to compute for torch.compile's fake tensors."""


def grouped_rows(out: torch.Tensor, x: torch.Tensor, ranges: Sequence[tuple[int, int]], ops: Sequence[RowOp],
                 gather: torch.Tensor | None = None) -> None:
    """For each weight i, rows `[start, start + count)` = `ranges[i]` of the input through `ops[i]` (all of one op
    name) into the same rows of `out [R, N]` (x.dtype), in one parallel region over the weights; other rows of
    `out` are left as they are. The input is `x [R, K]` (contiguous), or its rows `gather [R]` (int64) when given.
    Needs `load_extension()` to have succeeded."""
    bounds = [bound for start, count in ranges for bound in (start, start + count)]
    torch.ops.nano_cpu.grouped_rows_(out, x, gather, bounds, ops[0].op, [t for op in ops for t in op.tensors],
                                     [i for op in ops for i in op.ints])


def weighted_row_sum(src: torch.Tensor, weights: torch.Tensor | None, index: torch.Tensor, targets: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """`out [targets, N]` (dtype): zeros in float32 plus `src [R, N]` row r (times `weights [R]` float32 when given)
    into row `index[r]` (int64), for r in order, then rounded to dtype: bit for bit what the torch ops below
    compute (where the extension did not build), with no barrier at decode sizes."""
    if not load_extension():
        return torch.ops.nano_cpu.weighted_row_sum(src, weights, index, targets, dtype)
    rows = src.float() if weights is None else src.float() * weights[:, None]
    return torch.zeros(targets, src.shape[1], dtype=torch.float32).index_add_(0, index, rows).to(dtype)
