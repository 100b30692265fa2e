"""The grouped MoE dequantize-GEMM (kernels/triton_moe.fused_moe_nano) against a bf16 per-expert baseline, side by
side in one run: the experts of one MoE block (w13, silu * up, w2 with the routing weights) for T tokens.

    python benchmarks/moe_kernels.py --device cuda --out /tmp/gpu/moe-kernels.json
    TRITON_INTERPRET=1 python benchmarks/moe_kernels.py --device cpu --quick   # a smoke run of the same flow

Baseline: the experts' dequantized weights in bfloat16 and a torch loop over the experts that received tokens
(`F.linear` = cuBLAS per expert, the gated activation, `index_add_` of the weighted rows): what a framework
without a grouped kernel runs (the GPU image has no vLLM, so vLLM's own fused_moe cannot be the baseline). It
reads the routing on the host, so it is timed eagerly (CUDA events, medians); ours is timed eagerly too, and
also replayed from a CUDA graph (`graph_ms`, no host sync in it). Expert weights are random codes and scales
(the kernel's speed does not depend on their values), routing random top-k. Every result is checked against the
baseline's output (relative error, bf16 against bf16). Shapes: Qwen3-30B-A3B's experts (H 2048, I 768, 128
experts, top 8) and Mixtral-8x7B's (H 4096, I 14336, 8 experts, top 2). Writes a JSON with provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import GRAPH_CALLS, device_name, median_ms
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
# name: (hidden H, expert intermediate I, experts E, top_k)
MODELS = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}
QUICK_MODELS = {"tiny": (256, 128, 8, 2)}
TOKENS = (1, 16, 64, 256, 2048)
SCHEMES = ("int4g128", "int8")
MAX_REL_ERROR = 2e-2


def random_experts(scheme_name: str, experts: int, n: int, k: int, device: str):
    """(StackedExperts of random stored tensors `[E, ...]`, their dequantized weights bf16 `[E, N, K]`)."""
    from nanoq_plugin.format.layout import param_specs
    from nanoq_plugin.format.reference import dequantize
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.kernels.triton_moe import stacked_experts

    scheme = parse_scheme(scheme_name)
    tensors = {}
    for name, spec in param_specs(scheme, n, k).items():
        shape = (experts, *spec.shape)
        if spec.dtype == torch.int32:
            tensors[name] = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device)
        elif spec.dtype == torch.int8:
            tensors[name] = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
        elif spec.dtype == torch.uint8:
            tensors[name] = torch.randint(0, 1 << scheme.bits, shape, dtype=torch.uint8, device=device)
        else:  # scales: about 1 / (sqrt(K) * code range), so activations keep their size through the block
            tensors[name] = (torch.rand(shape, device=device) + 0.5).to(spec.dtype) / (k ** 0.5 * (1 << scheme.bits))
    dense = torch.stack([dequantize({name: t[e] for name, t in tensors.items()}, scheme, n, k, torch.bfloat16)
                         for e in range(experts)])
    return stacked_experts(scheme, tensors, n, k), dense


def per_expert_bf16(x, w13, w2, topk_weights, topk_ids):
    """The baseline: for each expert that received tokens, its rows through bf16 `F.linear`, silu * up,
    `F.linear`, times their routing weights, summed per token in float32 -> `[T, H]` bf16."""
    from nanoq_plugin.kernels.triton_moe import silu_and_mul

    tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = order[start:start + count]
        start += count
        token_rows = rows // top_k
        down = F.linear(silu_and_mul(F.linear(x[token_rows], w13[expert])), w2[expert])
        out.index_add_(0, token_rows, down.float() * weights[rows, None])
    return out.to(x.dtype)


def graph_ms(fn, repeats: int) -> float:
    from nanoq_plugin.kernels.cuda_graph import capture_calls

    fn()
    return median_ms(capture_calls(fn, GRAPH_CALLS).replay, "cuda", repeats) / GRAPH_CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all of MODELS")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts T (default {TOKENS})")
    parser.add_argument("--all-configs", action="store_true",
                        help="also time every triton_moe.MOE_CONFIGS entry (graph-replayed), not only the chosen one")
    parser.add_argument("--quick", action="store_true", help="one tiny MoE, T in {1, 16}: a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    on_gpu = device == "cuda"
    if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("nanoq: error: on the CPU the Triton kernel runs only in its interpreter: set TRITON_INTERPRET=1 "
              "(a smoke run, not a timing)", file=sys.stderr)
        raise SystemExit(2)
    from nanoq_plugin.kernels.triton_moe import MOE_CONFIGS, choose_moe_config, fused_moe_nano

    models = QUICK_MODELS if args.quick else {name: MODELS[name] for name in args.models or MODELS}
    tokens_list = args.tokens or ((1, 16) if args.quick else TOKENS)
    repeats = args.repeats or (20 if on_gpu else 2)
    out_path = Path(args.out or REPO / "benchmarks/results" / f"moe-kernels-{device_name(device)}.json")
    rows, failures = [], []
    result = {"device": device_name(device), "provenance": provenance(device), "repeats": repeats,
              "baseline": "per-expert loop: bf16 dequantized weights, F.linear, silu*up, F.linear, index_add_ "
                          "(eager: it reads the routing on the host)",
              "max_rel_error": MAX_REL_ERROR, "failures": failures, "rows": rows}

    def write_results():  # after every case, so that a run stopped early keeps what it measured
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    torch.manual_seed(0)
    for model, (hidden, inter, experts, top_k) in models.items():
        for scheme in args.schemes:
            w13, dense13 = random_experts(scheme, experts, 2 * inter, hidden, device)
            w2, dense2 = random_experts(scheme, experts, hidden, inter, device)
            for tokens in tokens_list:
                x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
                scores = torch.randn(tokens, experts, device=device)
                topk_weights, topk_ids = torch.softmax(scores, dim=-1).topk(top_k, dim=-1)
                topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
                config = choose_moe_config(tokens * top_k, experts)
                reference = per_expert_bf16(x, dense13, dense2, topk_weights, topk_ids)
                out = fused_moe_nano(x, w13, w2, topk_weights, topk_ids, config=config)
                rel_error = (torch.linalg.norm(out.float() - reference.float())
                             / torch.linalg.norm(reference.float())).item()
                if not rel_error <= MAX_REL_ERROR:
                    failures.append(f"{model} {scheme} T={tokens}: rel error {rel_error:.2e}")
                base_ms = median_ms(lambda: per_expert_bf16(x, dense13, dense2, topk_weights, topk_ids), device,
                                    repeats)
                ours_ms = median_ms(lambda: fused_moe_nano(x, w13, w2, topk_weights, topk_ids, config=config),
                                    device, repeats)
                row = {"model": model, "H": hidden, "I": inter, "E": experts, "top_k": top_k, "T": tokens,
                       "scheme": scheme, "experts_hit": int(topk_ids.unique().numel()),
                       "config": dataclasses.asdict(config),
                       "bf16_per_expert_ms": base_ms, "ms": ours_ms, "speedup_vs_bf16_per_expert": base_ms / ours_ms,
                       "rel_error_vs_bf16_per_expert": rel_error}
                if on_gpu:
                    row["graph_ms"] = graph_ms(
                        lambda: fused_moe_nano(x, w13, w2, topk_weights, topk_ids, config=config), repeats)
                    row["graph_speedup_vs_bf16_per_expert"] = base_ms / row["graph_ms"]
                    if args.all_configs:
                        row["graph_ms_by_config"] = {
                            f"{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}": graph_ms(
                                lambda c=c: fused_moe_nano(x, w13, w2, topk_weights, topk_ids, config=c), repeats)
                            for c in MOE_CONFIGS}
                rows.append(row)
                write_results()
                graph = f"  graph {row['graph_ms']:.4f} ms ({row['graph_speedup_vs_bf16_per_expert']:.2f}x)" \
                    if on_gpu else ""
                print(f"{model} {scheme} T={tokens:5d}  bf16 per-expert {base_ms:.4f} ms  ours {ours_ms:.4f} ms "
                      f"({base_ms / ours_ms:.2f}x){graph}  rel error {rel_error:.1e}", flush=True)
    write_results()
    print(f"wrote {out_path}")
    if failures:
        raise SystemExit(f"{len(failures)} MoE results off the baseline by more than {MAX_REL_ERROR}: "
                         + "; ".join(failures[:5]))


if __name__ == "__main__":
    main()
