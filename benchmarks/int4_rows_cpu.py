"""Per-call time of one int4 (w4g128) weight on the CPU against the number of activation rows, op by op: which op
a kernel should run for how many rows (`CpuInt4GroupKernel` chooses by rows; a MoE expert gets a few rows each).

    python benchmarks/int4_rows_cpu.py                       # torch's threads (one per core)
    python benchmarks/int4_rows_cpu.py --threads 1

    op                  what it runs (bf16 activations)                                  needs
    aten_int4pack       aten._weight_int4pack_mm_for_cpu on PyTorch's packing            torch >= 2.5
    avx2_panel          nano_cpu::int4_linear_avx2: weights decoded once into a float32  AVX2 (hardware: it runs
                        panel, float32 FMAs                                              here whatever the cap)
    avx512bf16_panel    nano_cpu::int4pack_linear_avx512bf16: PyTorch's packing decoded  AVX-512 BF16
                        once into a bfloat16 panel, vdpbf16ps
    dense_expand        the weight expanded to bf16, then oneDNN's GEMM (`cpu_int4`'s     PyTorch's AVX-512 packing
                        many-row path)
    kernel_apply        what `CpuInt4GroupKernel.apply` runs at that row count
    bf16_linear         torch.nn.functional.linear on the dequantized bf16 weight: the unquantized baseline

Each op that the CPU runs is timed on the same weight (RTN-quantized random matrix) and input; each repeat runs
every op in turn (interleaved, so a background job slows them alike), medians. Writes a JSON with provenance and
the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
# name: (N, K): Qwen3-30B-A3B's expert projections (gate+up fused, down) and a square 1024
SHAPES = {"qwen3-moe-w13": (1536, 2048), "qwen3-moe-w2": (2048, 768), "square-1024": (1024, 1024)}
ROWS = (1, 2, 4, 8, 16, 32, 64)


def candidates(n: int, k: int, scheme_name: str) -> dict:
    """op name -> `fn(x)` for every op of the module docstring this CPU runs, on one random weight [n, k]."""
    from nanoq_plugin.format.reference import dequantize
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.kernels import cpu_int4, cpu_weight_only_avx2
    from nanoq_plugin.kernels.base import LinearConfig
    from nanoq_plugin.kernels.cpu_isa import detect
    from nanoq_plugin.kernels.dispatch import KERNELS
    from nanoq_plugin.quantizers.rtn import quantize_rtn

    scheme = parse_scheme(scheme_name)
    stored = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k ** 0.5, scheme)
    config = LinearConfig(scheme, n, k, torch.bfloat16, "cpu")
    g = scheme.group_size
    pack = KERNELS["cpu_int4pack"].prepare(stored, config)
    fns = {"aten_int4pack": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, pack["packed"], g,
                                                                                  pack["scale_zeros"])}
    if detect().avx2 and not cpu_weight_only_avx2.load_extension():
        panel = KERNELS["cpu_int4_avx2"].prepare(stored, config)
        fns["avx2_panel"] = lambda x: torch.ops.nano_cpu.int4_linear_avx2(x, panel["packed"], panel["scales"],
                                                                          panel["offsets"], g)
    if not cpu_int4.panel_missing(config, torch.bfloat16):
        fns["avx512bf16_panel"] = lambda x: torch.ops.nano_cpu.int4pack_linear_avx512bf16(
            x, pack["packed"], pack["scale_zeros"], g)
    if n % cpu_int4.BLOCK_ROWS == 0 and cpu_int4.blocked64_layout():
        fns["dense_expand"] = lambda x: cpu_int4.chunked_matmul(
            x, n, lambda n0, n1, buffer: cpu_int4.CpuInt4GroupKernel._expand(pack["packed"], pack["scale_zeros"],
                                                                              config, n0, n1, buffer),
            row_multiple=cpu_int4.BLOCK_ROWS)
    fns["kernel_apply"] = lambda x: KERNELS["cpu_int4pack"].apply(x, pack, config)
    dense = dequantize(stored, scheme, n, k).to(torch.bfloat16)
    fns["bf16_linear"] = lambda x: torch.nn.functional.linear(x, dense)
    return fns


def time_ops(fns: dict, x: torch.Tensor, repeats: int, calls: int) -> dict[str, float]:
    """Median us per call of each op on `x`: `repeats` rounds, each timing `calls` calls of every op in turn."""
    for fn in fns.values():
        fn(x)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: round(statistics.median(values), 1) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="int4g128")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: all")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nanoq_plugin.kernels.cpu_isa import cpu_features

    label = f"cpu-{cpu_features().label}-{torch.get_num_threads()}threads"
    out_path = Path(args.out or REPO / "benchmarks/results" / f"int4-rows-{label}.json")
    rows = []
    result = {"device": label, "provenance": provenance("cpu"), "scheme": args.scheme, "repeats": args.repeats,
              "unit": "us per call (median)", "rows": rows}
    generator = torch.Generator().manual_seed(1)
    for shape in args.shapes or SHAPES:
        n, k = SHAPES[shape]
        fns = candidates(n, k, args.scheme)
        for count in args.rows:
            x = torch.randn(count, k, generator=generator).to(torch.bfloat16)
            load_before = os.getloadavg()[0]
            us = time_ops(fns, x, args.repeats, calls=max(2, 64 // count))
            row = {"shape": shape, "N": n, "K": k, "rows": count, "us": us,
                   "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            rows.append(row)
            print(f"{shape} [{n}x{k}] rows {count:3d}: " + "  ".join(f"{name} {v:8.1f}" for name, v in us.items())
                  + f"  load {row['load_average_1m']}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    sys.exit(main())
