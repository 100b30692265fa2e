"""`nanoq eval` speed on SmolLM2-135M (the example model): a quantized checkpoint's eval against the base
model's, and against scoring through the kernels (the CPU reference dequantizes every weight on every call).

Each model's eval is what `nanoq eval` runs per model: load, perplexity over the first `--windows` windows of
WikiText-2 raw test (context 512, stride 256, float32) and the three greedy samples; the tokenized text is
shared. A repeat times the base and every preset back to back (the order rotates between repeats), so that
each ratio compares neighbouring measurements on a shared machine; the JSON keeps every repeat and the
spread of the ratios. `--kernels-windows` windows are also scored through the kernels (`--scoring kernels`,
the path `nanoq eval` took before), once, to give its time per window and check that its perplexity on those
windows equals the dequantized model's. Writes benchmarks/results/eval-speed-smollm2.json.

    python benchmarks/eval_speed.py [--windows 8] [--repeats 3] [--presets w8 w4g128] [--kernels-windows 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.eval.quantized_model import load_quantized_model
from nanoq_plugin.eval.samples import greedy_samples
from nanoq_plugin.example_model import write_example_model
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tests/data/wikitext-2-raw/wiki.test.raw"  # CC BY-SA 3.0 (tests/data/README.md)
CTX, STRIDE = 512, 256
GOAL = 1.3  # issue 20: eval of a quantized checkpoint costs at most 1.3x the base model's


def timed_eval(load, token_ids: torch.Tensor, tokenizer, windows: int) -> dict:
    """Load with `load()`, score `windows` windows, generate the samples: seconds of each and the perplexity."""
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter()
    result = evaluate_perplexity({"model": model}, token_ids, CTX, STRIDE, windows, progress=False)
    scored = time.perf_counter()
    greedy_samples(model, tokenizer)
    done = time.perf_counter()
    return {"load_s": round(loaded - start, 2), "perplexity_s": round(scored - loaded, 2),
            "samples_s": round(done - scored, 2), "total_s": round(done - start, 2),
            "per_window_s": round((scored - loaded) / result.windows, 3),
            "perplexity": result.perplexity["model"], "windows": result.windows}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "values": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["w8", "w4g128"])
    parser.add_argument("--kernels-windows", type=int, default=2, help="windows scored through the kernels (0: skip)")
    parser.add_argument("--work", default=str(REPO / ".cache/eval-speed"), help="checkpoints: reused, else made here")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/eval-speed-smollm2.json"))
    args = parser.parse_args()

    base_dir = REPO / ".cache/smollm2"
    if not (base_dir / "model.safetensors").is_file():
        write_example_model(base_dir)
    checkpoints = {}
    for preset in args.presets:
        target = Path(args.work) / f"smollm2-{preset}"
        if not (target / "nano_manifest.json").is_file():
            quantize_checkpoint(base_dir, target, load_recipe(preset), progress=True)
        checkpoints[preset] = load_nano_checkpoint(target)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    token_ids = tokenizer(WIKITEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]

    loaders = {"base": lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
    for preset, checkpoint in checkpoints.items():
        loaders[preset] = lambda c=checkpoint: load_quantized_model(c, torch.float32, "dequantized")[0]
    names = list(loaders)
    repeats = []
    for index in range(args.repeats):
        order = names[index % len(names):] + names[:index % len(names)]
        run = {}
        for name in order:
            run[name] = timed_eval(loaders[name], token_ids, tokenizer, args.windows)
            print(f"repeat {index + 1}/{args.repeats} {name}: {run[name]}", flush=True)
        repeats.append({"order": order, "models": run})

    rows = []
    for preset, checkpoint in checkpoints.items():
        total = [r["models"][preset]["total_s"] / r["models"]["base"]["total_s"] for r in repeats]
        scoring = [r["models"][preset]["perplexity_s"] / r["models"]["base"]["perplexity_s"] for r in repeats]
        row = {"preset": preset, "checkpoint": str(checkpoint.directory.relative_to(REPO)),
               "perplexity": round(repeats[0]["models"][preset]["perplexity"], 4),
               "ratio_total": spread(total), "ratio_perplexity_only": spread(scoring),
               "meets_goal": statistics.median(total) <= GOAL}
        if args.kernels_windows:
            kernels = timed_eval(lambda c=checkpoint: load_quantized_model(c, torch.float32, "kernels")[0],
                                 token_ids, tokenizer, args.kernels_windows)
            model = loaders[preset]()
            same_windows = evaluate_perplexity({"m": model}, token_ids, CTX, STRIDE, args.kernels_windows,
                                               progress=False).perplexity["m"]
            per_window = statistics.median(r["models"][preset]["per_window_s"] for r in repeats)
            row["kernels"] = {**kernels, "dequantized_perplexity_same_windows": same_windows,
                              "same_perplexity": same_windows == kernels["perplexity"],
                              "per_window_slowdown_vs_dequantized": round(kernels["per_window_s"] / per_window, 2)}
            print(f"{preset} through the kernels: {row['kernels']}", flush=True)
        rows.append(row)
        print(f"{preset}: total ratio {row['ratio_total']}, perplexity-only ratio {row['ratio_perplexity_only']}")

    report = {
        "provenance": provenance(),
        "benchmark": "eval-speed-smollm2",
        "model": "SmolLM2-135M-Instruct (nanoq example-model), float32 on the CPU",
        "protocol": {"text": "wikitext-2-raw wiki.test.raw", "ctx": CTX, "stride": STRIDE, "windows": args.windows,
                     "repeats": args.repeats, "kernels_windows": args.kernels_windows,
                     "timed": "load + perplexity + 3 greedy samples of 32 tokens, per model; tokenization shared"},
        "goal": f"quantized eval / base eval <= {GOAL} (issue 20)",
        "scoring": "dequantized (nanoq eval's default): weight-only modules dequantized once by format.reference",
        "results": rows,
        "repeats": repeats,
        "note": "2 cores shared with other jobs: single timings are noisy; the ratios compare neighbouring runs",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
