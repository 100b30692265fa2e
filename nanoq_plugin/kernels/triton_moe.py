"""Grouped dequantize-GEMM for mixture-of-experts layers on CUDA, in Triton: the tokens sorted by expert, every
expert's weight read in its stored format (triton_dequant.load_weight_tile) — vLLM's `fused_moe` structure with
nano's dequantizer in the inner loop.

Stacked tensors, one row per expert, exactly as `engines.vllm_moe.NanoFusedMoEMethod` registers them (E experts,
K input features, N output features, G group size, b bits; per-expert layout in triton_dequant):

| scheme kind             | tensor  | dtype   | shape              |
|-------------------------|---------|---------|--------------------|
| int_group (b = 2,3,4,8) | qweight | int32   | [E, K*b/32, N]     |
| int_group               | scales  | float16 | [E, K/G, N]        |
| int_group asymmetric    | zeros   | uint8   | [E, K/G, N]        |
| int8_channel (`int8`)   | qweight | int8    | [E, K, N]          |
| int8_channel            | scales  | float16 | [E, N]             |

w13 (gate and up, N = 2I) has K = H; w2 (down) has K = I, N = H. Codebook experts are not served here: each
expert rotates its inputs with its own signs, which would need one rotated copy of x per (token, expert) pair.

`fused_moe_nano(x [T, H], w13, w2, topk_weights [T, k], topk_ids [T, k]) -> [T, H]`:
1. `align_tokens_by_expert`: the T*k (token, slot) rows sorted by expert, each expert's run padded to a multiple
   of BLOCK_M with a sentinel row, and the expert of every block of BLOCK_M sorted rows (vLLM's
   moe_align_block_size, in torch ops without a host sync, so that it can run inside a CUDA graph);
2. `moe_dequant_gemm_kernel` on w13: one program per (block of sorted rows, block of N) reads its block's expert,
   gathers its rows' tokens from x and dequantizes that expert's weight tiles in registers -> `[T*k, 2I]`;
3. the gated activation (silu(gate) * up unless the caller gives vLLM's) -> `[T*k, I]`;
4. the same kernel on w2, each row scaled by its routing weight, into float32 `[T*k, H]`; the k slots of a token
   are summed (no atomics: every output element is written once, results are deterministic) -> `[T, H]`.

Launch configurations are chosen by a rule on the rows per expert (vLLM's default-config idea), not tuned by
timing yet; `MOE_CONFIGS` lists the candidates the AOT check compiles and benchmarks/kernels.py times.
Activations float16 / bfloat16 go to `tl.dot` in their own dtype (widened to float32 only in the interpreter, as
in triton_gemm); float32 activations use IEEE float32 dots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import NanoqError
from ..format.schemes import Scheme, SchemeKind
from .triton_dequant import FMT_INT8_CHANNEL, FMT_INT_GROUP, JIT_FMT_INT8_CHANNEL, load_weight_tile
from .triton_gemm import WeightFormat, _dot, dot_in_float32, interpreting

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unsupported_reason(scheme: Scheme | None) -> str | None:
    """Why the grouped Triton kernel cannot serve experts of `scheme` on CUDA, or None when it can (None: float
    experts are not served by it either; `NanoFusedMoEMethod` refuses them on CUDA)."""
    if scheme is None:
        return "float experts next to quantized ones are not served by the Triton MoE kernel"
    if scheme.kind not in (SchemeKind.INT_GROUP, SchemeKind.INT8_CHANNEL):
        return (f"scheme {scheme.name} has no grouped Triton MoE kernel (int_group and int8 experts have one: "
                "quantize the experts with e.g. int4g128)")
    if scheme.quantizes_activations:
        return f"scheme {scheme.name} quantizes activations, which the Triton MoE kernel does not"
    return None


@dataclass(frozen=True)
class StackedExperts:
    """One projection (w13 or w2) of all experts, as stored (layout table above): `side` is the zeros of an
    asymmetric int_group scheme, else None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    side: torch.Tensor | None
    weight: WeightFormat
    out_features: int
    in_features: int

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]


def stacked_experts(scheme: Scheme, tensors: Mapping[str, torch.Tensor], out_features: int,
                    in_features: int) -> StackedExperts:
    """`StackedExperts` of the stored `[E, ...]` tensors (name -> tensor) of one role; NanoqError where the scheme
    is not served (`unsupported_reason`) or a tensor's shape is not the table's."""
    reason = unsupported_reason(scheme)
    if reason is not None:
        raise NanoqError(reason)
    from ..format.layout import param_specs

    specs = param_specs(scheme, out_features, in_features)
    experts = tensors["qweight"].shape[0]
    for name in scheme.kind.kernel_tensors(scheme):
        expected = (experts, *specs[name].shape)
        if tuple(tensors[name].shape) != expected or tensors[name].dtype != specs[name].dtype:
            raise NanoqError(f"stacked expert tensor '{name}' is {tensors[name].dtype} {list(tensors[name].shape)}, "
                             f"expected {specs[name].dtype} {list(expected)} for scheme {scheme.name}")
    is_int8 = scheme.kind is SchemeKind.INT8_CHANNEL
    side = None if is_int8 else tensors.get("zeros")
    weight = WeightFormat(FMT_INT8_CHANNEL if is_int8 else FMT_INT_GROUP, scheme.bits, scheme.group_size or 0,
                          side is not None)
    return StackedExperts(tensors["qweight"].contiguous(), tensors["scales"].contiguous(),
                          None if side is None else side.contiguous(), weight, out_features, in_features)


def max_padded_rows(rows: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the sorted rows after padding, known without reading the routing: each expert that gets
    rows (at most min(E, rows) of them) adds fewer than `block_m` padding rows."""
    return triton.cdiv(rows + min(num_experts, rows) * (block_m - 1), block_m) * block_m


def align_tokens_by_expert(topk_ids: torch.Tensor, num_experts: int,
                           block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the routed rows by expert and pad each expert's run to a multiple of `block_m` (vLLM's
    moe_align_block_size). Torch ops only, none of which waits for the GPU (no `.item()`, no bincount).

    `topk_ids [T, k]` holds local expert ids in `[0, num_experts)`, or -1 for a row whose expert is on another rank
    (expert parallelism): such rows are left out. Row r = t * k + j is token t's j-th expert. Returns
    - `sorted_rows` int32 `[max_padded_rows(T*k, E, block_m)]`: the rows of expert 0, then of expert 1, ... (each
      expert's in increasing row order), each expert's run followed by the sentinel `T*k` up to a multiple of
      `block_m`; the sentinel fills everything after the last run;
    - `block_experts` int32 `[len(sorted_rows) // block_m]`: the expert of each block of `block_m` sorted rows
      (blocks past the last run hold E - 1, and are never computed);
    - `padded_rows` int32 `[1]`: the sorted rows that are computed (every block below it belongs to one expert).
    """
    ids = topk_ids.reshape(-1).to(torch.int64)
    rows = ids.numel()
    device = ids.device
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, ids + 1, torch.ones_like(ids))  # counts[0]: rows on other ranks
    local = counts[1:]
    padded = (local + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    # where each expert's rows begin in the stable sort below (the other ranks' rows, id -1, sort first)
    sorted_starts = torch.cumsum(local, 0) - local + counts[0]
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    expert = sorted_ids.clamp(min=0)
    capacity = max_padded_rows(rows, num_experts, block_m)
    position = torch.arange(rows, device=device)
    # other ranks' rows go to one extra slot past the end, cut off below
    dest = torch.where(sorted_ids >= 0, padded_starts[expert] + position - sorted_starts[expert], capacity)
    sorted_rows = torch.full((capacity + 1,), rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_rows[:capacity], block_experts.to(torch.int32), padded_ends[-1:].to(torch.int32)


# The number of routed rows changes with every batch: specializing on it would compile each configuration again.
@triton.jit(do_not_specialize=["num_rows"])
def moe_dequant_gemm_kernel(
    a_ptr,  # [A rows, K] float16 / bfloat16 / float32, row stride stride_am, unit column stride
    qweight_ptr,  # [E, ...] stored codes, expert stride stride_qe (layout table)
    scales_ptr,  # float16 [E, K/G, N] (int_group) or [E, N] (int8), expert stride stride_se
    side_ptr,  # uint8 zeros [E, K/G, N] (asymmetric int_group; strides as scales) or a dummy
    out_ptr,  # [num_rows, N], row stride stride_om
    weights_ptr,  # float32 [num_rows]: the routing weight of each row (read with MUL_ROUTED_WEIGHT)
    sorted_rows_ptr,  # int32 [grid_m * BLOCK_M] (align_tokens_by_expert), sentinel num_rows
    block_experts_ptr,  # int32 [grid_m]
    padded_rows_ptr,  # int32 [1]
    N, K, num_rows,
    stride_am, stride_om, stride_qe, stride_q, stride_se, stride_s,
    ROWS_PER_A: tl.constexpr,  # routed row r reads activation row r // ROWS_PER_A (top_k for x [T, H]; 1 after)
    MUL_ROUTED_WEIGHT: tl.constexpr,
    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # the grid covers the largest padding any routing can need; blocks past this routing's rows do nothing
    if pid_m * BLOCK_M < tl.load(padded_rows_ptr):
        rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        mask_m = rows < num_rows
        a_rows = (rows // ROWS_PER_A).to(tl.int64)
        expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
        expert_q = qweight_ptr + expert * stride_qe
        expert_s = scales_ptr + expert * stride_se
        expert_side = side_ptr + expert * stride_se  # zeros, or the scales again as a dummy: both [E, ...]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            w = load_weight_tile(expert_q, expert_s, expert_side, k0, offs_n, mask_n, K, stride_q, stride_s,
                                 FMT, BITS, GROUP, HAS_ZEROS, BLOCK_K)
            acc = _dot(a, w, acc, False, DOT_FP32, IEEE_DOT)
        if FMT == JIT_FMT_INT8_CHANNEL:
            acc *= tl.load(expert_s + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        if MUL_ROUTED_WEIGHT:
            acc *= tl.load(weights_ptr + rows, mask=mask_m, other=0.0)[:, None]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class MoeConfig:
    """One launch configuration of `moe_dequant_gemm_kernel` (BLOCK_M is also the alignment of the sort)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# decode (few rows per expert) to prefill; the first is the one the interpreter tests and the AOT check use most
MOE_CONFIGS = (
    MoeConfig(16, 64, 128), MoeConfig(32, 64, 128), MoeConfig(64, 128, 64), MoeConfig(128, 128, 64, num_warps=8),
)


def choose_moe_config(rows: int, num_experts: int) -> MoeConfig:
    """A configuration for `rows` routed rows over `num_experts` experts, by the average rows per expert (the
    block height that wastes little padding): a rule, not yet tuned on a GPU."""
    per_expert = rows / max(num_experts, 1)
    for config, limit in zip(MOE_CONFIGS, (16, 48, 384)):
        if per_expert <= limit:
            return config
    return MOE_CONFIGS[-1]


def kernel_constexprs(weight: WeightFormat, config: MoeConfig, n: int, k: int, rows_per_a: int,
                      mul_routed_weight: bool, act_dtype: torch.dtype, interpret: bool) -> dict[str, int | bool]:
    """The constexpr arguments of one `moe_dequant_gemm_kernel` launch (also what the AOT check compiles): tiles
    clamped to the problem (powers of two; BLOCK_K at least 32, which 3-bit words need)."""
    return dict(
        ROWS_PER_A=rows_per_a, MUL_ROUTED_WEIGHT=mul_routed_weight, **weight.constexprs(),
        DOT_FP32=dot_in_float32(act_dtype, interpret), IEEE_DOT=act_dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=min(config.block_n, max(16, triton.next_power_of_2(n))),
        BLOCK_K=min(config.block_k, max(32, triton.next_power_of_2(k))),
    )


def grouped_gemm(a: torch.Tensor, experts: StackedExperts, out: torch.Tensor, routing: tuple, rows_per_a: int,
                 config: MoeConfig, routed_weights: torch.Tensor | None = None) -> torch.Tensor:
    """`out[r] = a[r // rows_per_a] @ W[expert of r].T` (times `routed_weights[r]` when given) for every routed row
    r of `routing` (`align_tokens_by_expert` with `config.block_m`); rows not routed are left as they are.
    `a [A, K]` (unit column stride), `out [rows, N]`."""
    sorted_rows, block_experts, padded_rows = routing
    if a.stride(-1) != 1:
        a = a.contiguous()
    n, k = experts.out_features, experts.in_features
    if a.shape[-1] != k or out.shape[-1] != n:
        raise ValueError(f"activations [.., {a.shape[-1]}] -> out [.., {out.shape[-1]}] do not fit experts "
                         f"of K={k}, N={n}")
    constexprs = kernel_constexprs(experts.weight, config, n, k, rows_per_a, routed_weights is not None,
                                   a.dtype, interpreting())
    grid = (block_experts.numel(), triton.cdiv(n, constexprs["BLOCK_N"]))
    scales = experts.scales
    moe_dequant_gemm_kernel[grid](
        a, experts.qweight, scales, experts.side if experts.side is not None else scales, out,
        routed_weights if routed_weights is not None else scales, sorted_rows, block_experts, padded_rows,
        n, k, out.shape[0],
        a.stride(0), out.stride(0), experts.qweight[0].numel(), experts.qweight.stride(1), scales[0].numel(),
        scales.stride(1) if scales.dim() == 3 else 0,
        **constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of `gate_up [.., 2I]` (gate first, as vLLM's silu_and_mul) -> `[.., I]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe_nano(
    x: torch.Tensor,
    w13: StackedExperts,
    w2: StackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    apply_router_weight_on_input: bool = False,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """The experts of an MoE block: `x [T, H]` routed to local experts `topk_ids [T, k]` (-1: another rank's) with
    weights `topk_weights [T, k]` -> `sum_j topk_weights[t, j] * w2(activation(w13(x[t])))` of expert
    `topk_ids[t, j]`, `[T, H]` in x.dtype, summed in float32 (module docstring). With
    `apply_router_weight_on_input` the weight scales w13's output instead of w2's (w13 is linear, so this equals
    scaling the input, as vLLM does for top-1 routing). `activation` maps `[R, 2I]` to `[R, I]`."""
    tokens, top_k = topk_ids.shape
    hidden = w2.out_features
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"activation dtype {x.dtype} is not one of {ACT_DTYPES}")
    if tokens == 0:
        return x.new_zeros((0, hidden))
    rows = tokens * top_k
    config = config or choose_moe_config(rows, w13.num_experts)
    routing = align_tokens_by_expert(topk_ids, w13.num_experts, config.block_m)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    gate_up = torch.empty((rows, w13.out_features), dtype=x.dtype, device=x.device)  # other ranks' rows: unread
    grouped_gemm(x, w13, gate_up, routing, top_k, config, weights if apply_router_weight_on_input else None)
    activated = activation(gate_up)
    down = torch.zeros((rows, hidden), dtype=torch.float32, device=x.device)  # other ranks' rows stay 0
    grouped_gemm(activated, w2, down, routing, 1, config, None if apply_router_weight_on_input else weights)
    return down.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
