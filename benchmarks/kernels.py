"""Quantized GEMM kernels against the bf16 matmul baseline (`F.linear` on an `[N, K]` weight, as nn.Linear
runs it: cuBLAS on a GPU, oneDNN/MKL on the CPU), measured side by side in one run.

    python benchmarks/kernels.py --device cuda      # fused Triton kernels vs cuBLAS bf16 (and our int8)
    python benchmarks/kernels.py --device cpu       # our CPU kernels and PyTorch's, after our repack
    benchmarks/avx2_emulation/run.sh python benchmarks/kernels.py --device cpu   # as an AVX2-only CPU runs it
    taskset -c 1 python benchmarks/kernels.py --device cpu --threads 1   # one core

For each scheme, M (tokens) and weight shape (K, N) it times `kernels.ops.apply_linear` on a prepared
layer (the path vLLM and transformers run) and `torch.matmul` on the bf16 weight: medians of CUDA-event
(GPU) or wall-clock (CPU) timings; on a GPU both also replayed from a CUDA graph (`graph_*`: GPU time
without Python's launch overhead, which at small M is most of an eager call). It prints speed-up ratios
(baseline time / ours) and achieved GB/s of
the weight stream against a measured device copy bandwidth, checks each kernel once against the
reference, and writes benchmarks/results/kernels-<device>.json (on the CPU, <device> names the kernel ISA:
cpu-avx512-vnni-bf16-2threads, cpu-avx2-2threads, ...; the file records the CPU model and flags). On the CPU
it also times the reference kernel (dequantize the whole weight, then matmul: what a layer runs when no fast
kernel fits) at M <= 16, the figure behind the dispatcher's fallback warning. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from nanoq_plugin.format.layout import param_specs, stored_bytes
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.kernels.cuda_graph import capture_calls
from nanoq_plugin.kernels.custom_ops import triton_weight_format
from nanoq_plugin.kernels.ops import apply_linear, prepare_linear
from nanoq_plugin.kernels.base import LinearConfig
from nanoq_plugin.kernels.cpu_isa import cpu_features
from nanoq_plugin.kernels.reference_linear import ReferenceKernel
from nanoq_plugin.quantizers.data_free import quantize_data_free
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
GPU_M = (1, 4, 16, 64, 256, 2048)
GPU_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (2048, 6144))
CPU_M = (1, 4, 8, 16, 64, 256)  # 8 / 16 straddle cpu_dense.DENSE_MIN_ROWS
CPU_SHAPES = ((2048, 2048), (2048, 6144), (4096, 4096))
SCHEMES = ("int8", "int4g128", "int3g128", "int2g64", "int8g128", "cb4g128", "cb3g128")
CPU_SCHEMES = ("int8", "int8-a8", "int4g128", "int3g128", "int2g64", "int8g128", "cb4g128", "cb3g128")
REFERENCE_MAX_M = 16  # the reference's cost is the dequantization, the same at every M: timed where it matters
MAX_REL_ERROR = 2e-2  # bf16 activations against the float32 reference: anything above is a wrong kernel


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{cpu_features().label}-{torch.get_num_threads()}threads"


def median_ms(fn, device: str, repeats: int) -> float:
    """Median time of `fn()` in milliseconds after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


GRAPH_CALLS = 20


def graph_median_ms(fn, repeats: int) -> float:
    """Median time of one `fn()` in milliseconds, replayed from a CUDA graph of GRAPH_CALLS calls: the GPU time
    without Python's launch overhead (what a serving engine's captured decode step pays)."""
    fn()
    return median_ms(capture_calls(fn, GRAPH_CALLS).replay, "cuda", repeats) / GRAPH_CALLS


def copy_bandwidth_gbs(device: str) -> float:
    """Device memory copy bandwidth (read + write bytes per second), GB/s."""
    size = 2**30 if device == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 10)
    return 2 * size / (ms * 1e-3) / 1e9


def quantized_layer(scheme_name: str, n: int, k: int, device: str):
    """Stored tensors of a random `[n, k]` weight (RTN, or nearest level for codebooks, on the device) and its
    bf16 dequantized weight."""
    scheme = parse_scheme(scheme_name)
    weight = torch.randn(n, k, device=device) * 0.02
    tensors = quantize_data_free(weight, scheme)
    return scheme, tensors, dequantize(tensors, scheme, n, k, dtype=torch.bfloat16).contiguous()


def vllm_onednn_w8a8():
    """vLLM-CPU's own W8A8 GEMM (per-token int8 quantization, then oneDNN's int8 GEMM: what a compressed-tensors
    W8A8 checkpoint runs there) as `make(stored int8 tensors) -> (x -> y)`, or None where vLLM is not installed."""
    try:
        from vllm import _custom_ops as vllm_ops
    except Exception:  # no vLLM in this environment: the column is left out
        return None

    def make(tensors):
        qweight = tensors["qweight"].t().contiguous().t()  # [K, N] viewing [N, K] rows, as vLLM passes its weight
        scales = tensors["scales"].to(torch.float32).reshape(-1, 1)
        handler = vllm_ops.create_onednn_scaled_mm(qweight, scales, torch.bfloat16, True, False, 32)

        def run(x):
            x_q, x_scale, x_zero = vllm_ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty(x.shape[0], qweight.shape[1], dtype=x.dtype)
            vllm_ops.onednn_scaled_mm(handler, x_q, out, x_scale, x_zero, None, None)
            return out
        return run
    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", nargs="+", help="default: SCHEMES on CUDA, CPU_SCHEMES (with int8-a8) on the CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}: a smoke run")
    parser.add_argument("--m", type=int, nargs="+", help="token counts (default: GPU_M / CPU_M)")
    parser.add_argument("--shapes", nargs="+", help="weight shapes as KxN (default: GPU_SHAPES / CPU_SHAPES)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; vLLM-CPU here runs 1 per rank)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    on_gpu = device == "cuda"
    args.schemes = args.schemes or list(SCHEMES if on_gpu else CPU_SCHEMES)
    w8a8_baseline = None if on_gpu else vllm_onednn_w8a8()
    m_values = GPU_M if on_gpu else CPU_M
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if args.quick:
        m_values, shapes = (1, 16), shapes[:1]
    m_values = args.m or m_values
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes] if args.shapes else shapes
    repeats = args.repeats or (50 if on_gpu else 7)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs(device)
    print(f"device {device_name(device)}, copy bandwidth {bandwidth:.0f} GB/s, torch {torch.__version__}", flush=True)
    rows = []
    failures = []
    run_provenance = provenance(device)
    out_path = Path(args.out or REPO / "benchmarks/results" / f"kernels-{device_name(device)}.json")

    def write_results():  # after every shape too, so that a run stopped early keeps what it measured
        result = {
            "device": device_name(device), "provenance": run_provenance, "copy_bandwidth_gbs": bandwidth,
            "threads": torch.get_num_threads(), "repeats": repeats,
            "baseline": "F.linear bfloat16, weight [N, K] contiguous",
            "max_rel_error": MAX_REL_ERROR, "failures": failures, "rows": rows,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    for k, n in shapes:
        layers = {s: quantized_layer(s, n, k, device) for s in args.schemes}
        dense = layers[args.schemes[0]][2]
        prepared_layers, prepare_s = {}, {}
        for scheme_name, (scheme, tensors, _) in layers.items():
            start = time.perf_counter()  # on CUDA: Triton compilation (first shape) and tuning of every M bucket
            prepared_layers[scheme_name] = prepare_linear(tensors, scheme, n, k, torch.bfloat16, device)
            prepare_s[scheme_name] = time.perf_counter() - start
        onednn = w8a8_baseline(layers["int8-a8"][1]) if w8a8_baseline and "int8-a8" in layers else None
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base_ms = median_ms(lambda: torch.nn.functional.linear(x, dense), device, repeats)
            row = {"M": m, "K": k, "N": n, "bf16_matmul_ms": base_ms, "kernels": {}}
            if on_gpu:
                row["bf16_matmul_graph_ms"] = graph_median_ms(lambda: torch.nn.functional.linear(x, dense), repeats)
            if onednn is not None:
                row["vllm_onednn_w8a8_ms"] = median_ms(lambda: onednn(x), device, repeats)
            for scheme_name, (scheme, _, reference) in layers.items():
                prepared = prepared_layers[scheme_name]
                out = apply_linear(x, prepared)
                ref = x.float() @ reference.float().t()
                rel_error = (torch.linalg.norm(out.float() - ref) / torch.linalg.norm(ref)).item()
                if not rel_error <= MAX_REL_ERROR:
                    failures.append(f"{scheme_name} M={m} K={k} N={n}: rel error {rel_error:.2e}")
                ms = median_ms(lambda: apply_linear(x, prepared), device, repeats)
                weight_bytes = stored_bytes(param_specs(scheme, n, k))
                entry = row["kernels"][scheme_name] = {
                    "kernel": prepared.kernel, "ms": ms, "speedup_vs_bf16": base_ms / ms,
                    "weight_gbs": weight_bytes / (ms * 1e-3) / 1e9,
                    "weight_bandwidth_fraction": weight_bytes / (ms * 1e-3) / 1e9 / bandwidth,
                    "rel_error_vs_reference": rel_error, "prepare_s": prepare_s[scheme_name],
                }
                if not on_gpu and m <= REFERENCE_MAX_M and prepared.kernel != "reference":
                    config = LinearConfig(scheme, n, k, torch.bfloat16, device)
                    stored = layers[scheme_name][1]
                    reference_ms = median_ms(lambda: ReferenceKernel().apply(x, stored, config), device, repeats)
                    entry.update(reference_ms=reference_ms, speedup_vs_reference=reference_ms / ms)
                if prepared.kernel == "triton":
                    from nanoq_plugin.kernels.triton_gemm import tuned_config

                    fmt, _ = triton_weight_format(prepared.config.scheme, prepared.tensors)
                    chosen = tuned_config(m, n, k, fmt, torch.bfloat16)
                    entry["tile"] = dataclasses.asdict(chosen) if chosen else None
                if on_gpu:
                    graph_ms = graph_median_ms(lambda: apply_linear(x, prepared), repeats)
                    entry.update(graph_ms=graph_ms, graph_speedup_vs_bf16=row["bf16_matmul_graph_ms"] / graph_ms,
                                 graph_weight_bandwidth_fraction=weight_bytes / (graph_ms * 1e-3) / 1e9 / bandwidth)
            if "vllm_onednn_w8a8_ms" in row:
                entry = row["kernels"]["int8-a8"]
                entry["speedup_vs_vllm_onednn_w8a8"] = row["vllm_onednn_w8a8_ms"] / entry["ms"]
            if "int8" in row["kernels"]:
                int8_ms = row["kernels"]["int8"]["ms"]
                for entry in row["kernels"].values():
                    entry["speedup_vs_our_int8"] = int8_ms / entry["ms"]
            rows.append(row)
            if on_gpu:  # graph-replayed ratios, and the fraction of copy bandwidth the weight stream reached
                cells = "  ".join(
                    f"{s} {e['graph_speedup_vs_bf16']:.2f}x ({100 * e['graph_weight_bandwidth_fraction']:.0f}%)"
                    for s, e in row["kernels"].items())
                print(f"K={k:5d} N={n:5d} M={m:4d}  bf16 graph {row['bf16_matmul_graph_ms']:7.4f} ms  {cells}",
                      flush=True)
            else:
                cells = "  ".join(f"{s} {e['speedup_vs_bf16']:.2f}x ({e['kernel']}, {e['weight_gbs']:.0f} GB/s)"
                                  for s, e in row["kernels"].items())
                if "vllm_onednn_w8a8_ms" in row:
                    versus = row["kernels"]["int8-a8"]["speedup_vs_vllm_onednn_w8a8"]
                    cells += f"  int8-a8 vs vLLM oneDNN W8A8 {versus:.2f}x"
                print(f"K={k:5d} N={n:5d} M={m:4d}  bf16 {base_ms:8.3f} ms  {cells}", flush=True)
        write_results()
    write_results()
    print(f"wrote {out_path}")
    if failures:
        raise SystemExit(f"{len(failures)} kernel results off the reference by more than {MAX_REL_ERROR}: "
                         + "; ".join(failures[:5]))


if __name__ == "__main__":
    main()
