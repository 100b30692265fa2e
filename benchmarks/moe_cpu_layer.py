"""One MoE layer's experts on the CPU: nano's quantized path (`NanoFusedMoEMethod.run_experts`, the code vLLM
serves) against vLLM-CPU's bf16 fused op (`cpu_fused_moe` on prepacked weights, what `CPUUnquantizedExperts` runs
for this CPU's ISA), side by side in one run, at T tokens of decode / a small prefill.

    python benchmarks/moe_cpu_layer.py                   # both shapes, T in {1, 16, 64}
    python benchmarks/moe_cpu_layer.py --quick           # the serving shape only, few repeats
    python benchmarks/moe_cpu_layer.py --threads 1       # one thread: no barriers (a loaded machine's timings of
                                                         # two threads are mostly waits for a descheduled thread)

Also timed in the same run: `per_expert` — one expert at a time (gather its rows, w13 by `apply_linear`, the
activation, w2, routing weight, `index_add_`), the loop `run_experts` ran before it grouped the experts; the
nano output must equal it bit for bit. Each repeat times the three in turn (interleaved, so a background job
slows them alike); medians. `breakdown_ms` splits one `run_experts` call with torch.profiler into routing
bookkeeping (argsort, bincount, the host read of the counts, row indices), gathers (indexing rows; the grouped
path gathers inside its w13 op), w13 and w2 (their ranges, Python included), the activation, the combine (routing
weights and the sum into the tokens: `mul` and `index_add_`, or `weighted_row_sum`), and the rest (Python and
small ops); the profiler's own cost inflates every part, so it shows shares, not times.

Expert weights are RTN-quantized random matrices (int4g128 by default), the bf16 baseline their dequantized
values; routing is softmax top-k over random logits. Writes a JSON with provenance and the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
# name: (hidden H, expert intermediate I, experts E, top_k)
SHAPES = {"serve-qwen3-moe": (1024, 512, 32, 4), "qwen3-30b-a3b-half": (2048, 768, 64, 8)}
TOKENS = (1, 16, 64)


def build_layer(scheme_name: str, hidden: int, inter: int, experts: int, seed: int = 0):
    """(method, stand-in layer, bf16 dense w13 [E, 2I, H], w2 [E, H, I]): random experts RTN-quantized and
    prepared for this CPU's kernels the way `NanoFusedMoEMethod.process_weights_after_loading` prepares them."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from nanoq_plugin.engines.vllm_moe import NanoFusedMoEMethod
    from nanoq_plugin.format.reference import dequantize
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.kernels.cpu_grouped import load_extension
    from nanoq_plugin.kernels.ops import prepare_linear
    from nanoq_plugin.quantizers.rtn import quantize_rtn

    scheme = parse_scheme(scheme_name)
    generator = torch.Generator().manual_seed(seed)
    prepared, dense = {"w13": [], "w2": []}, {"w13": [], "w2": []}
    for role, (n, k, parts) in {"w13": (2 * inter, hidden, [inter, inter]), "w2": (hidden, inter, [hidden])}.items():
        for e in range(experts):
            stored = quantize_rtn(torch.randn(n, k, generator=generator) / k ** 0.5, scheme)
            prepared[role].append(prepare_linear(stored, scheme, n, k, torch.bfloat16, "cpu",
                                                 where=f"expert {e} ({role})", part_sizes=parts))
            dense[role].append(dequantize(stored, scheme, n, k).to(torch.bfloat16))
    layer = SimpleNamespace(nano_experts=prepared, activation=MoEActivation.SILU, apply_router_weight_on_input=False,
                            expert_map=None, local_num_experts=experts)
    method = NanoFusedMoEMethod.__new__(NanoFusedMoEMethod)  # no vLLM layer config: only what run_experts reads
    method.prefix, method.schemes, method.moe_quant_config = "bench", {"w13": scheme, "w2": scheme}, None
    method.moe = SimpleNamespace(is_act_and_mul=True, swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None,
                                 activation_situ_beta=None, activation_situ_linear_beta=None)
    load_extension()  # as process_weights_after_loading does
    return method, layer, torch.stack(dense["w13"]), torch.stack(dense["w2"])


def vllm_isa() -> str:
    """The ISA name `CPUUnquantizedExperts` (or its x86 AMX subclass) passes to vLLM's fused op on this CPU."""
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def per_expert(method, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               ranges=None) -> torch.Tensor:
    """One expert at a time: the loop `run_experts` ran before grouping (its numerics are the reference).
    `ranges(name)` (a profiler range) marks its w13, activation and w2 for `breakdown`."""
    from vllm.model_executor.layers.fused_moe.activation import ApplyMoEActivationConfig, apply_moe_activation

    from nanoq_plugin.kernels.ops import apply_linear

    ranges = ranges or (lambda name: contextlib.nullcontext())
    tokens, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).float()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=layer.local_num_experts).tolist()
    config = ApplyMoEActivationConfig.from_configs(method.moe, method.get_fused_moe_quant_config(layer))
    out = torch.zeros(tokens, x.shape[-1], dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = order[start:start + count]
        start += count
        token_rows = rows // top_k
        hidden = x[token_rows]
        with ranges("w13"):
            gate_up = apply_linear(hidden, layer.nano_experts["w13"][expert])
        with ranges("activation"):
            activated = torch.empty(count, gate_up.shape[-1] // 2, dtype=gate_up.dtype)
            apply_moe_activation(layer.activation, activated, gate_up, activation_config=config)
        with ranges("w2"):
            down = apply_linear(activated, layer.nano_experts["w2"][expert])
        out.index_add_(0, token_rows, down.float() * weights[rows, None])
    return out.to(x.dtype)


ROUTING_OPS = ("aten::argsort", "aten::sort", "aten::bincount", "aten::tolist", "aten::_local_scalar_dense",
               "aten::floor_divide", "aten::div", "aten::add", "aten::reshape", "aten::_to_copy", "aten::to")
PARTS = ("routing", "gather", "w13", "activation", "w2", "combine", "other")
COMBINE_OPS = ("aten::index_add_", "aten::mul", "nano_cpu::weighted_row_sum")


def breakdown_nano(method, layer, x, topk_weights, topk_ids, calls: int) -> dict[str, float]:
    """`breakdown` of `run_experts`, its w13 / w2 (`_grouped`) and activation marked by wrapping them."""
    from torch.profiler import record_function

    import nanoq_plugin.engines.vllm_moe as vllm_moe

    grouped, activation = method._grouped, vllm_moe.apply_moe_activation

    def marked_grouped(layer_, role, *args, **kwargs):
        with record_function(f"part.{role}"):
            return grouped(layer_, role, *args, **kwargs)

    def marked_activation(*args, **kwargs):
        with record_function("part.activation"):
            return activation(*args, **kwargs)

    method._grouped, vllm_moe.apply_moe_activation = marked_grouped, marked_activation
    try:
        return breakdown(lambda: method.run_experts(layer, x, topk_weights, topk_ids), calls)
    finally:
        del method._grouped
        vllm_moe.apply_moe_activation = activation


def breakdown(fn, calls: int) -> dict[str, float]:
    """ms per `fn()` call by part (module docstring), from torch.profiler over `calls` calls: the `part.<name>`
    ranges, and the ops `fn` calls directly by name; `other` is the rest of the time inside `fn`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function("part.total"):
                fn()
    parts = dict.fromkeys(PARTS, 0.0)
    total = 0.0
    for event in prof.events():
        if event.name == "part.total":
            total += event.cpu_time_total
        elif event.cpu_parent is not None and event.cpu_parent.name == "part.total":
            part = (event.name.removeprefix("part.") if event.name.startswith("part.") else
                    "routing" if event.name in ROUTING_OPS else
                    "gather" if event.name == "aten::index" else
                    "combine" if event.name in COMBINE_OPS else "other")
            parts[part] += event.cpu_time_total
    parts["other"] = total - sum(parts.values()) + parts["other"]
    result = {name: round(value / calls / 1e3, 4) for name, value in parts.items()}
    result["total"] = round(total / calls / 1e3, 4)
    return result


def part_range(name: str):
    """A profiler range `part.<name>` (`breakdown` sums it as that part)."""
    from torch.profiler import record_function

    return record_function(f"part.{name}")


def time_side_by_side(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each `fns` entry, the entries run in turn each repeat after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def measure_shape(shape: str, dims: tuple[int, int, int, int], scheme: str, token_counts: list[int], repeats: int,
                  isa: str):
    """Yield one result row per T for one MoE shape (H, I, E, top_k), printing each as it is measured."""
    import vllm._custom_ops as vllm_ops

    hidden, inter, experts, top_k = dims
    method, layer, dense13, dense2 = build_layer(scheme, hidden, inter, experts)
    w13, w2 = vllm_ops.cpu_prepack_moe_weight(dense13, isa), vllm_ops.cpu_prepack_moe_weight(dense2, isa)
    del dense13, dense2
    generator = torch.Generator().manual_seed(1)
    calls = max(3, repeats // 4)
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
        topk_weights, topk_ids = torch.softmax(torch.randn(tokens, experts, generator=generator), -1).topk(top_k)
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
        topk_ids = topk_ids.to(torch.int32)
        bf16_out = torch.empty_like(x)

        def bf16():
            vllm_ops.cpu_fused_moe(bf16_out, x, w13, w2, None, None, topk_weights, topk_ids, "silu", isa, False)

        def nano():
            return method.run_experts(layer, x, topk_weights, topk_ids)

        def before():
            return per_expert(method, layer, x, topk_weights, topk_ids)

        ours, reference = nano(), before()
        bf16()
        load_before = os.getloadavg()[0]
        ms = time_side_by_side({"bf16": bf16, "nano": nano, "per_expert": before}, repeats)
        row = {"shape": shape, "H": hidden, "I": inter, "E": experts, "top_k": top_k, "T": tokens,
               "rows_per_active_expert": round(tokens * top_k / int(topk_ids.unique().numel()), 2),
               "experts_hit": int(topk_ids.unique().numel()), "bf16_ms": ms["bf16"][0], "ms": ms["nano"][0],
               "per_expert_ms": ms["per_expert"][0], "ratio": ms["bf16"][0] / ms["nano"][0],
               "per_expert_ratio": ms["bf16"][0] / ms["per_expert"][0],
               "min_ms": {name: value[1] for name, value in ms.items()},
               "ratio_of_mins": ms["bf16"][1] / ms["nano"][1],
               "per_expert_ratio_of_mins": ms["bf16"][1] / ms["per_expert"][1],
               "bit_identical_to_per_expert": torch.equal(ours, reference),
               "rel_error_vs_bf16": ((ours.float() - bf16_out.float()).norm() / bf16_out.float().norm()).item(),
               "breakdown_ms": breakdown_nano(method, layer, x, topk_weights, topk_ids, calls),
               "per_expert_breakdown_ms": breakdown(
                   lambda: per_expert(method, layer, x, topk_weights, topk_ids, part_range), calls),
               "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        print(f"{shape} T={tokens:3d}  median: bf16 {row['bf16_ms']:.3f} ms  nano {row['ms']:.3f} ms "
              f"({row['ratio']:.2f}x)  per-expert {row['per_expert_ms']:.3f} ms ({row['per_expert_ratio']:.2f}x)  "
              f"min ratios: nano {row['ratio_of_mins']:.2f}x per-expert {row['per_expert_ratio_of_mins']:.2f}x  "
              f"load {row['load_average_1m']}", flush=True)
        for name in ("breakdown_ms", "per_expert_breakdown_ms"):
            print(f"    {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in row[name].items()), flush=True)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int4g128")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: all")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--quick", action="store_true", help="the serving shape, 8 repeats: a smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    importlib.import_module("vllm")  # which may set torch's threads: ours are set after it

    if args.threads:
        torch.set_num_threads(args.threads)  # after vLLM's import, which may set its own

    from nanoq_plugin.kernels.cpu_isa import cpu_features

    shapes = {name: SHAPES[name] for name in (["serve-qwen3-moe"] if args.quick else args.shapes or SHAPES)}
    repeats = 8 if args.quick else args.repeats
    label = f"cpu-{cpu_features().label}-{torch.get_num_threads()}threads"
    out_path = Path(args.out or REPO / "benchmarks/results" / f"moe-cpu-layer-{label}.json")
    isa = vllm_isa()
    rows = []
    result = {"device": label, "provenance": provenance("cpu"), "scheme": args.scheme, "repeats": repeats,
              "baseline": f"vLLM-CPU bf16 fused experts: cpu_fused_moe on cpu_prepack_moe_weight weights, isa "
                          f"'{isa}' (CPUUnquantizedExperts on this CPU)",
              "ratio": "bf16_ms / ms (medians; ratio_of_mins: the fastest repeats'): above 1 the nano path is faster "
                       "than vLLM's bf16 experts", "rows": rows}
    failures = []
    for shape, dims in shapes.items():
        for row in measure_shape(shape, dims, args.scheme, args.tokens, repeats, isa):
            rows.append(row)
            if not row["bit_identical_to_per_expert"]:
                failures.append(f"{shape} T={row['T']}: run_experts differs from the per-expert loop")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1) + "\n")
    result["failures"] = failures
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    sys.exit(main())
