"""Fused dequantize-GEMM in Triton: `out [M, N] = x [M, K] @ W [N, K].T`, W read in its stored format.

One kernel, two families of launch configurations:
- decode (M <= 64): BLOCK_M 16 and split-K, so that a GEMV still spreads the weight stream over every SM;
  each K slice writes float32 partial sums `[split_k, M, N]` that are added afterwards (no atomics, so
  every output element is written exactly once and results are deterministic);
- prefill (M > 64): tiled BLOCK_M x BLOCK_N, one K slice, tensor cores through `tl.dot`; or, when tuning
  finds it faster, `DEQUANTIZE_THEN_GEMM`: the whole weight dequantized in one pass, then cuBLAS.

Weights are dequantized tile by tile by `triton_dequant.load_weight_tile` (layout table there).
Activations float16 / bfloat16 go to `tl.dot` in their own dtype with float32 accumulation; float32
activations use IEEE float32 dots (no TF32). Under `TRITON_INTERPRET=1` (CPU tests) 16-bit dots are
computed in float32, because the interpreter's 16-bit `tl.dot` is wrong; that is the only difference.

Autotuning: configurations live below, M is bucketed to a power of two, and `warm_up` runs every bucket up
to 512 once after loading (the sizes CUDA graphs capture), so that tuning never happens inside a capture;
a capture that meets an untuned shape uses the first candidate instead of tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .cuda_graph import capture_calls
from .triton_dequant import FMT_CODEBOOK, FMT_INT8_CHANNEL, FMT_INT_GROUP, JIT_FMT_INT8_CHANNEL, load_weight_tile

DECODE_MAX_M = 64


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_float32(act_dtype: torch.dtype, interpret: bool) -> bool:
    """Whether 16-bit activation tiles are widened to float32 before `tl.dot` (only in the interpreter)."""
    return interpret and act_dtype in (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of `dequant_gemm_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # decode: compute out.T = W @ x.T (see the kernel)
    dequantize_first: bool = False  # not a tile: see DEQUANTIZE_THEN_GEMM


DECODE_CONFIGS = tuple(
    TileConfig(16, bn, bk, sk, num_warps=4)
    for bn in (64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)
) + tuple(
    # weight-first tiles: on sm_90 the compiler makes them warpgroup MMAs fed by 16-byte shared stores, where
    # the tiles above store the dequantized weight 2 bytes at a time (compiled here, not yet timed on a GPU)
    TileConfig(16, bn, 128, sk, num_warps=4, swap_ab=True)
    for bn in (64, 128) for sk in (1, 2, 4, 8)
)
PREFILL_CONFIGS = (
    TileConfig(64, 64, 64, 1), TileConfig(64, 128, 64, 1), TileConfig(128, 128, 64, 1, num_warps=8),
    TileConfig(128, 64, 64, 1), TileConfig(128, 256, 64, 1, num_warps=8), TileConfig(64, 128, 128, 1),
    # weight-first: on sm_90 the dequantized tile is the warpgroup MMA's register operand, with no 2-byte
    # shared-memory stores (the tiles above make 32-128 per thread per step); not yet timed on a GPU
    TileConfig(64, 128, 64, 1, swap_ab=True), TileConfig(128, 128, 64, 1, num_warps=8, swap_ab=True),
    TileConfig(64, 128, 128, 1, swap_ab=True), TileConfig(128, 256, 64, 1, num_warps=8, swap_ab=True),
)


# Not a tile: "dequantize the whole weight to the activation dtype (`dequantize_kernel`), then the
# framework's GEMM (cuBLAS)". A prefill candidate: at large M the GEMM is compute-bound, cuBLAS's tiles beat
# ours, and one pass writing W costs little next to it (vLLM's AWQ path does the same from 256 tokens).
DEQUANTIZE_THEN_GEMM = TileConfig(64, 64, 64, 1, dequantize_first=True)

MAX_M_BUCKET = 4096


def m_bucket(m: int) -> int:
    """Autotuning key for M: the next power of two, capped at `MAX_M_BUCKET` (a new batch size re-tunes at most
    once per power of two)."""
    return min(triton.next_power_of_2(max(m, 1)), MAX_M_BUCKET)


@triton.jit
def _dot(x, w, acc, WEIGHT_FIRST: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_DOT: tl.constexpr):
    """`acc + x @ w`, or `acc + w @ x` with WEIGHT_FIRST, in float32. The float32 dequantized weight tile is cast
    to the activations' dtype, except where the dot runs in float32: IEEE float32 activations, and the
    interpreter's widened 16-bit dots (see `dot_in_float32`), which widen the activations instead."""
    if DOT_FP32:
        x = x.to(tl.float32)
    else:
        w = w.to(x.dtype)
    if WEIGHT_FIRST:
        a = w
        b = x
    else:
        a = x
        b = w
    if IEEE_DOT:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


# M varies with every batch: specializing on it (M == 1, M % 16 == 0) would compile each configuration
# up to three times, at run time, in the serving engine.
@triton.jit(do_not_specialize=["M"])
def dequant_gemm_kernel(
    x_ptr,  # [M, K] float16 / bfloat16 / float32, row stride stride_xm, unit column stride
    qweight_ptr,  # stored codes (triton_dequant layout table)
    scales_ptr,  # float16 [K/G, N] (int_group) or [N] (int8 per channel)
    side_ptr,  # the format's side tensor (triton_dequant): zeros uint8 [K/G, N], codebook levels, or a dummy
    out_ptr,  # [M, N] in x's dtype; float32 [split_k, M, N] partial sums if WRITE_PARTIALS
    M, N, K,
    stride_xm, stride_om, stride_osplit, stride_q, stride_s,
    k_per_split,  # multiple of BLOCK_K
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_PARTIALS: tl.constexpr,
    SWAP_AB: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    if SWAP_AB:
        # out.T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x.T: the weight tile is unpacked with K as its fast axis
        # (whole words per thread, stored to shared memory in 16-byte vectors) and, as the MMA's left operand,
        # fills its 64-row dimension while a decode batch fills only the narrow one.
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k_offset in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k_offset + tl.arange(0, BLOCK_K)
            x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                          mask=mask_m[None, :] & (offs_k < K)[:, None], other=0.0)
            w = load_weight_tile(qweight_ptr, scales_ptr, side_ptr, k_start + k_offset, offs_n, mask_n, K,
                                 stride_q, stride_s, FMT, BITS, GROUP, HAS_ZEROS, BLOCK_K, True)
            acc_t = _dot(x_t, w, acc_t, True, DOT_FP32, IEEE_DOT)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_offset in range(0, k_per_split, BLOCK_K):
            offs_k = k_start + k_offset + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            w = load_weight_tile(qweight_ptr, scales_ptr, side_ptr, k_start + k_offset, offs_n, mask_n, K,
                                 stride_q, stride_s, FMT, BITS, GROUP, HAS_ZEROS, BLOCK_K)
            acc = _dot(x, w, acc, False, DOT_FP32, IEEE_DOT)
    if FMT == JIT_FMT_INT8_CHANNEL:
        acc *= tl.load(scales_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if not WRITE_PARTIALS:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_k * stride_osplit + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=out_mask)


@triton.jit
def dequantize_kernel(
    qweight_ptr, scales_ptr, side_ptr,  # as in dequant_gemm_kernel
    out_ptr,  # [K, N] row-major, the activation dtype
    N, K, stride_q, stride_s,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = load_weight_tile(qweight_ptr, scales_ptr, side_ptr, k0, offs_n, mask_n, K,
                         stride_q, stride_s, FMT, BITS, GROUP, HAS_ZEROS, BLOCK_K)
    if FMT == JIT_FMT_INT8_CHANNEL:
        w *= tl.load(scales_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k < K)[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class WeightFormat:
    """Constexpr description of a stored weight for the kernel (see `triton_dequant`)."""

    fmt: int
    bits: int
    group_size: int
    has_zeros: bool

    def constexprs(self) -> dict[str, int | bool]:
        """The constexpr arguments that describe the stored format (every kernel that reads weights takes them)."""
        return dict(FMT=self.fmt, BITS=self.bits, GROUP=self.group_size, HAS_ZEROS=self.has_zeros)


# The kinds the Triton dequantizer reads, and the tensor each passes in the kernels' side slot.
TRITON_FORMATS = {"int_group": FMT_INT_GROUP, "int8_channel": FMT_INT8_CHANNEL, "codebook": FMT_CODEBOOK}
SIDE_TENSOR = {"int_group": "zeros", "codebook": "codebook"}


def weight_format_of(scheme, tensors) -> tuple[WeightFormat, torch.Tensor | None]:
    """The `WeightFormat` of a scheme (format.schemes.Scheme) of a kind in `TRITON_FORMATS`, and the stored
    tensor (name -> tensor `tensors`) its kernels read in the side slot, None where it has none."""
    fmt = TRITON_FORMATS[scheme.kind.value]
    side = tensors.get(SIDE_TENSOR.get(scheme.kind.value, ""))
    has_zeros = fmt == FMT_INT_GROUP and side is not None
    return WeightFormat(fmt, scheme.bits, scheme.group_size or 0, has_zeros), side


def split_k_of(m: int, k: int, config: TileConfig) -> tuple[int, int]:
    """(number of K slices, K elements per slice) that `launch` uses for `x [m, k]` with `config`."""
    split_k = config.split_k if m <= DECODE_MAX_M else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), config.block_k) * config.block_k
    return triton.cdiv(k, k_per_split), k_per_split


def kernel_constexprs(weight: WeightFormat, config: TileConfig, split_k: int, act_dtype: torch.dtype,
                      interpret: bool) -> dict[str, int | bool]:
    """The constexpr arguments of `dequant_gemm_kernel` for one launch (also what tests compile ahead of time)."""
    return dict(
        **weight.constexprs(),
        DOT_FP32=dot_in_float32(act_dtype, interpret), IEEE_DOT=act_dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, WRITE_PARTIALS=split_k > 1,
        SWAP_AB=config.swap_ab,
    )


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, side: torch.Tensor | None,
                      weight: WeightFormat, out_features: int, in_features: int, dtype: torch.dtype,
                      block_k: int = 64, block_n: int = 64) -> torch.Tensor:
    """The stored weight as `W.T [K, N]` in `dtype` (a codebook's *rotated* weight), in one Triton pass."""
    out = torch.empty((in_features, out_features), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(out_features, block_n))
    dequantize_kernel[grid](
        qweight, scales, side if side is not None else scales, out,
        out_features, in_features, qweight.stride(0), scales.stride(0) if scales.dim() == 2 else 0,
        **weight.constexprs(), BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    side: torch.Tensor | None,
    weight: WeightFormat,
    out_features: int,
    config: TileConfig,
    out: torch.Tensor | None = None,
    partials: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the kernel once with `config`: `x [M, K]` (unit column stride) -> `[M, out_features]` in x.dtype.

    `out` ([M, N], x.dtype) and `partials` (float32 [split_k, M, N]) may be given, e.g. poisoned by tests.
    """
    m, k = x.shape
    n = out_features
    if config.dequantize_first:
        weight_t = dequantize_weight(qweight, scales, side, weight, n, k, x.dtype, config.block_k, config.block_n)
        return torch.matmul(x, weight_t) if out is None else torch.matmul(x, weight_t, out=out)
    if x.stride(1) != 1:
        x = x.contiguous()
    split_k, k_per_split = split_k_of(m, k, config)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split_k == 1:
        target = out
    else:
        target = (partials if partials is not None
                  else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device))
        if tuple(target.shape) != (split_k, m, n):
            raise ValueError(f"partials must be float32 [{split_k}, {m}, {n}], got {list(target.shape)}")
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
    dequant_gemm_kernel[grid](
        x, qweight, scales, side if side is not None else scales, target,
        m, n, k,
        x.stride(0), n, m * n, qweight.stride(0), scales.stride(0) if scales.dim() == 2 else 0,
        k_per_split,
        **kernel_constexprs(weight, config, split_k, x.dtype, interpreting()),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        out.copy_(target.sum(dim=0))
    return out


_TUNED: dict[tuple, TileConfig] = {}


def _time_ms(fn, repeats: int = 10) -> float:
    """GPU time of one `fn()` in ms, from `repeats` calls captured in one CUDA graph and replayed: launched
    eagerly, a decode-sized kernel (~10-40 µs on an H200) is shorter than Python's launch overhead, and
    timing that would pick tiles at random (the first H200 run did). Eager timing where capture fails."""
    fn()  # compiles
    torch.cuda.synchronize()
    try:
        graph = capture_calls(fn, repeats)
        run = graph.replay
    except RuntimeError:
        graph = None

        def run():
            for _ in range(repeats):
                fn()
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / repeats


def tuned_config(m: int, out_features: int, in_features: int, weight: WeightFormat,
                 dtype: torch.dtype) -> TileConfig | None:
    """The configuration tuning chose for this problem, or None if it has not run (benchmarks report it)."""
    return _TUNED.get((m_bucket(m), out_features, in_features, weight, dtype))


def candidate_configs(m: int, n: int, k: int) -> list[TileConfig]:
    """Configurations worth trying for this problem: tiles clamped to it, duplicates dropped."""
    family = DECODE_CONFIGS if m <= DECODE_MAX_M else PREFILL_CONFIGS + (DEQUANTIZE_THEN_GEMM,)
    out = []
    for c in family:
        block_n = min(c.block_n, max(16, triton.next_power_of_2(n)))
        block_k = min(c.block_k, max(32, triton.next_power_of_2(k)))
        split_k = max(1, min(c.split_k, k // block_k))
        clamped = TileConfig(c.block_m if m > DECODE_MAX_M else 16, block_n, block_k, split_k,
                             c.num_warps, c.num_stages, c.swap_ab, c.dequantize_first)
        if clamped not in out:
            out.append(clamped)
    return out


def choose_config(x: torch.Tensor, qweight, scales, side, weight: WeightFormat, out_features: int) -> TileConfig:
    """The tuned configuration for this (M bucket, N, K, format); tunes on first use unless interpreting."""
    m, k = x.shape
    key = (m_bucket(m), out_features, k, weight, x.dtype)
    config = _TUNED.get(key)
    if config is not None:
        return config
    candidates = candidate_configs(m, out_features, k)
    if interpreting() or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        config = candidates[0]
    else:
        probe = torch.randn((m_bucket(m), k), dtype=x.dtype, device=x.device) if m_bucket(m) != m else x
        timings = []
        for candidate in candidates:
            try:
                ms = _time_ms(lambda c=candidate: launch(probe, qweight, scales, side, weight, out_features, c))
            except OutOfResources:  # e.g. a large tile with too many stages for this GPU's shared memory
                continue
            timings.append((ms, candidate))
        if not timings:
            raise RuntimeError(f"no Triton configuration fits this GPU for M={m}, N={out_features}, K={k}")
        config = min(timings, key=lambda t: t[0])[1]
    _TUNED[key] = config
    return config


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    side: torch.Tensor | None,
    weight: WeightFormat,
    out_features: int,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """`x [..., K]` -> `[..., out_features]` in x.dtype; `config` None picks the tuned one."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty((*lead, out_features))
    chosen = config or choose_config(x2, qweight, scales, side, weight, out_features)
    return launch(x2, qweight, scales, side, weight, out_features, chosen).view(*lead, out_features)


def warm_up(qweight, scales, side, weight: WeightFormat, out_features: int, in_features: int,
            dtype: torch.dtype, max_m: int = 512) -> None:
    """Tune every M bucket of one layer shape now (call after loading, before CUDA-graph capture)."""
    m = 1
    while m <= max_m:
        x = torch.randn((m, in_features), dtype=dtype, device=qweight.device)  # zeros can time faster than data
        dequant_gemm(x, qweight, scales, side, weight, out_features)
        m *= 2
