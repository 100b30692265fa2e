"""Render the result tables of the README and docs/ from the JSON files under benchmarks/results/.

Every table in a page sits between `<!-- table: NAME -->` and `<!-- /table -->`; this script replaces what is
between them with the output of `TABLES[NAME]`, which reads only result files. Numbers in those tables are
therefore never typed by hand; each table names the files (and their commits) it was made from.

    python benchmarks/tables.py           # rewrite the pages
    python benchmarks/tables.py --check   # exit 1 if a page differs from what the files give (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAGES = ("README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))))
MARKER = re.compile(r"(<!-- table: (?P<name>[\w.:-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def source(*names: str) -> str:
    """'Source: file (commit abc1234), ...' for the files a table was made from."""
    parts = []
    for name in names:
        provenance = load(name).get("provenance") or {}
        commit = provenance.get("commit")
        where = f"commit {commit[:10]}" if commit else "commit not recorded"
        if provenance.get("dirty"):
            where += ", uncommitted changes"
        parts.append(f"[{name}](/benchmarks/results/{name}) ({where})")
    return "Source: " + ", ".join(parts) + "."


QUALITY_ROWS = (  # (result id, what it is)
    ("w8", "int8 per channel, RTN"),
    ("w4g128", "int4 g128, RTN"),
    ("w4g128-gptq", "int4 g128, GPTQ"),
    ("w4g128-gptq-tuned-e2e", "int4 g128, GPTQ + block and end-to-end tuning"),
    ("nvfp4", "NVFP4, RTN"),
    ("cb4g128-gptq-tuned-long-e2e", "4-bit codebook g128, GPTQ + tuning"),
    ("cb3g128-gptq-tuned-e2e", "3-bit codebook g128, GPTQ + tuning"),
    ("cb2g64-gptq-tuned-e2e-long", "2-bit codebook g64, GPTQ + tuning"),
)


def quality_table() -> str:
    """Perplexity ratio to the float model per config (SmolLM2-135M, WikiText-2)."""
    data = load("quality-smollm2.json")
    rows = {row["preset"]: row for row in data["results"]}
    protocol = data["protocol"]
    lines = [f"SmolLM2-135M-Instruct, {protocol['text']}, context {protocol['ctx']}, stride {protocol['stride']}, "
             f"{protocol['windows']} windows; base perplexity {data['base_perplexity']:.2f}.", "",
             "| config | perplexity ratio to bf16 | bits / weight (quantized linears) |", "|---|---:|---:|"]
    for key, what in QUALITY_ROWS:
        row = rows[key]
        lines.append(f"| {what} | {row['ppl_ratio']:.3f} | {row['bits_per_weight_quantized_modules']:.2f} |")
    return "\n".join([*lines, "", source("quality-smollm2.json")])


# the configs measured on every example model: (result id, what it is)
MODEL_ROWS = (
    ("w8", "int8 per channel, RTN"),
    ("w4g128", "int4 g128, RTN"),
    ("w4g128-gptq", "int4 g128, GPTQ"),
    ("cb4g128-gptq-tuned", "4-bit codebook g128, GPTQ + block tuning"),
    ("cb3g128-gptq-tuned", "3-bit codebook g128, GPTQ + block tuning"),
)
MODEL_FILES = ("quality-smollm2.json", "quality-gemma3-270m.json")


def quality_models_table() -> str:
    """The same configs and protocol on each example model: perplexity ratio and bits per weight side by side."""
    reports = [load(name) for name in MODEL_FILES]
    names = [report["model"].split(" (")[0] for report in reports]
    protocol = reports[0]["protocol"]
    lines = [f"{protocol['text']}, context {protocol['ctx']}, stride {protocol['stride']}, {protocol['windows']} windows; "
             "perplexity ratio to the float model (bits / weight of the quantized linears). Base perplexity: "
             + ", ".join(f"{name} {report['base_perplexity']:.2f}" for name, report in zip(names, reports)) + ".", "",
             "| config | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = [{row["preset"]: row for row in report["results"]} for report in reports]
    for key, what in MODEL_ROWS:
        cells = [f"{r[key]['ppl_ratio']:.3f} ({r[key]['bits_per_weight_quantized_modules']:.2f})" if key in r
                 else "not measured" for r in rows]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", source(*MODEL_FILES)])


def quality_all_table(name: str = "quality-smollm2.json") -> str:
    """Every row of a quality report: config, method, calibration windows, ratio, bits per weight."""
    data = load(name)
    lines = ["| result | method | calibration windows | perplexity ratio | bits / weight (quantized linears) "
             "| commit |", "|---|---|---:|---:|---:|---|"]
    for row in data["results"]:
        windows = (row.get("calibration") or {}).get("windows")
        ratio = row["ppl_ratio"]
        shown = f"{ratio:.4f}" if ratio < 100 else f"{ratio:.3g} (diverges)"
        commit = (row.get("commit") or "")[:10] or "not recorded"  # merged rows keep their own commit
        lines.append(f"| `{row['preset']}` | {row['method']} | {windows or '—'} | {shown} | "
                     f"{row['bits_per_weight_quantized_modules']:.2f} | {commit} |")
    return "\n".join([*lines, "", f"Base perplexity {data['base_perplexity']:.2f}. " + source(name)])


SERVE_CONFIGS = (("nano-w8a8", "nano `w8a8`"), ("nano-w8", "nano `w8`"), ("nano-w4g128", "nano `w4g128`"),
                 ("w4a16-native", "vLLM's own W4A16"), ("nano-cb3g128", "nano `cb3g128`"))


def _serve_ratios(report: dict) -> dict[str, dict[int, float | None]]:
    """config -> concurrency -> mean output tokens/s ratio to the baseline over its runs (None: it failed)."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in report["runs"]:
        per = out.setdefault(run["config"], {})
        for level in run.get("levels", []):
            if level.get("throughput_ratio") is not None:
                per.setdefault(level["concurrency"], []).append(level["throughput_ratio"])
    return {config: {c: mean(v) for c, v in per.items()} for config, per in out.items()}


def isa_serving_table() -> str:
    """nano vs vLLM-CPU's own W8A8 at 1 and 16 requests, one column pair per CPU instruction set."""
    files = sorted(p.name for p in RESULTS.glob("serve-cpu-*-isa.json"))
    reports = {name: load(name) for name in files}
    header = ["| config |"]
    rule = ["|---|"]
    for name, report in reports.items():
        cpu = report["provenance"]["cpu"]
        label = "AVX2 (AVX-512 host capped)" if cpu["kernel_isa"] == "avx2" else cpu["kernel_isa"].upper()
        header.append(f" {label}: c=1 | c=16 |")
        rule.append("---:|---:|")
    lines = ["".join(header), "".join(rule)]
    ratios = {name: _serve_ratios(report) for name, report in reports.items()}
    for config, what in SERVE_CONFIGS:
        cells = []
        for name in reports:
            per = ratios[name].get(config)
            failed = any(run["config"] == config and "error" in run for run in reports[name]["runs"])
            for concurrency in (1, 16):
                value = (per or {}).get(concurrency)
                cells.append("fails" if failed and value is None else "—" if value is None else f"{value:.2f}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    first = next(iter(reports.values()))
    load_spec = first["load"]
    caption = (f"Output tokens/s over vLLM-CPU's own W8A8 (compressed-tensors, int8 x int8) on the same server "
               f"settings, one run each between two baseline runs; SmolLM2-135M-Instruct, {load_spec['prompt_tokens']}"
               f"-token prompts, {load_spec['output_tokens']} output tokens, 2 cores, otherwise idle. CPU: "
               f"{first['provenance']['cpu']['model']}.")
    return "\n".join([caption, "", *lines, "", source(*files)])


def cpu_kernel_table() -> str:
    """Per scheme and CPU ISA: the layer's speed-up over bf16 `F.linear` at 1 and 16 rows (4096 x 4096)."""
    files = sorted(p.name for p in RESULTS.glob("kernels-cpu-*threads.json"))
    lines = ["| ISA | scheme | kernel | M=1 × bf16 | M=16 × bf16 | M=1 × reference |",
             "|---|---|---|---:|---:|---:|"]
    for name in files:
        data = load(name)
        isa = data["provenance"]["cpu"]["kernel_isa"]
        rows = {row["M"]: row for row in data["rows"] if (row["K"], row["N"]) == (4096, 4096)}
        for scheme, one in rows[1]["kernels"].items():
            sixteen = rows[16]["kernels"][scheme]
            versus_reference = one.get("speedup_vs_reference")
            lines.append(f"| {isa} | {scheme} | {one['kernel']} | {one['speedup_vs_bf16']:.2f} | "
                         f"{sixteen['speedup_vs_bf16']:.2f} | "
                         f"{'—' if versus_reference is None else f'{versus_reference:.0f}'} |")
    caption = ("One 4096 x 4096 layer, bfloat16 activations, 2 threads; × bf16: `F.linear` on the bf16 weight "
               "over our kernel's time (on the capped runs bf16 is capped too); × reference: the reference kernel "
               "(dequantize every call) over the chosen kernel.")
    return "\n".join([caption, "", *lines, "", source(*files)])


def gpu_table() -> str:
    """Llama-3-8B-shaped decode steps on the GPU: weights, CUDA-graph step time and ratio to bf16."""
    data = load("e2e-NVIDIA-H200.json")
    lines = ["| | weights GiB | decode step, batch 1 | batch 16 |", "|---|---:|---:|---:|"]
    for variant in ("bf16", "w8", "w4g128"):
        entry = data["variants"][variant]
        steps = {step["batch"]: step for step in entry["decode_steps"]}
        cells = [f"{steps[b]['step_ms']:.2f} ms ({steps[b]['speedup_vs_bf16']:.2f}×)" for b in (1, 16)]
        lines.append(f"| {variant} | {entry['weight_gib']:.2f} | " + " | ".join(cells) + " |")
    caption = f"{data['model']} on one {data['device']}, transformers with a static cache, CUDA-graph decode step."
    return "\n".join([caption, "", *lines, "", source("e2e-NVIDIA-H200.json")])


def gguf_table() -> str:
    """GGUF exports of SmolLM2: file size, bits per weight, perplexity and logit agreement with the float model."""
    data = load("gguf-smollm2.json")
    protocol = data["protocol"]
    lines = [f"{protocol['text']}, context {protocol['ctx']}, stride {protocol['stride']}, {protocol['windows']} "
             f"windows: base perplexity {data['base_perplexity']:.2f}; logit agreement over "
             f"{data['results'][0]['agreement']['positions']} positions.", "",
             "| type | file | bits/weight (matrices) | perplexity (`nanoq eval`) | ratio | top-1 agreement | "
             "mean KL (nats) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in data["results"]:
        agreement = row["agreement"]
        lines.append(f"| {row['type']} | {row['file_bytes'] / 2**20:.1f} MiB | {row['bits_per_weight_matrices']:.2f} | "
                     f"{row['perplexity']:.4f} | {row['ppl_ratio']:.4f} | {agreement['top1_agreement']:.3f} | "
                     f"{agreement['mean_kl_nats']:.2g} |")
    return "\n".join([*lines, "", source("gguf-smollm2.json")])


def scale_table() -> str:
    """Quantizing large shapes on the CPU: per result file and run, wall time and peak RSS against the budget."""
    names = sorted(p.name for p in RESULTS.glob("scale-*.json"))
    lines = ["| shape | method | blocks | wall time | peak RSS above imports | budget | load average | commit |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in names:
        data = load(name)
        shape, budget = data["shape"], data["budget"]["total_bytes"]
        load_average = data["provenance"]["cpu"].get("load_average_1m")
        commit = (data["provenance"].get("commit") or "not recorded")[:10]
        described = (f"{shape['name']} (hidden {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']})")
        for run in data["runs"]:
            if run.get("extrapolated"):
                blocks = data.get("extrapolated_to_layers", shape["layers"])
                measured = run["blocks_measured"]
                how = (f"runs on {measured[0]} and {measured[1]} blocks" if len(measured) == 2
                       else f"its first {measured[0]} block{'s' if measured[0] > 1 else ''}, "
                            f"{run['per_block_seconds'] / 60:.1f} min each")
                lines.append(f"| {described} | {run['method']} {run['scheme']} | {blocks} | {run['seconds'] / 60:.1f} "
                             f"min, extrapolated from {how} | not measured | | | {commit} |")
                continue
            # peak_rss_after_imports_bytes is the RSS once python, torch and transformers are imported
            rss = run["peak_rss_bytes"] - run["peak_rss_after_imports_bytes"] if "peak_rss_after_imports_bytes" in run else None
            over = "" if rss is None else (" (within)" if rss <= budget else f" ({rss / budget - 1:+.0%})")
            lines.append(f"| {described} | {run['method']} {run['scheme']} | {run['blocks_run']} | "
                         f"{run['seconds'] / 60:.1f} min | "
                         + ("not measured" if rss is None else f"{rss / 1e9:.2f} GB{over}")
                         + f" | {budget / 1e9:.2f} GB | "
                         + ("not recorded" if load_average is None else f"{load_average:.1f}") + f" | {commit} |")
    caption = ("Random bf16 weights of the shape, 2 CPU cores; budget = two blocks of float weights + one output "
               "shard + the embedding; load average: runnable processes when the result was written (above 0, "
               "other jobs shared the cores and times are slower than an idle machine's).")
    return "\n".join([caption, "", *lines, "", source(*names)])


TABLES: dict[str, Callable[[], str]] = {
    "quality": quality_table,
    "quality-all": quality_all_table,
    "quality-models": quality_models_table,
    "quality-all-gemma3-270m": lambda: quality_all_table("quality-gemma3-270m.json"),
    "cpu-serving-isa": isa_serving_table,
    "cpu-kernels": cpu_kernel_table,
    "gpu": gpu_table,
    "gguf": gguf_table,
    "scale": scale_table,
}


def serve_summary_table(name: str) -> str:
    """One load-test result file: per config, weight bytes and output tokens/s as ratios to the baseline at each
    concurrency (mean of its runs, lowest–highest where it ran more than once)."""
    report = load(name)
    levels = [int(c) for c in report["baseline_reference"]["levels"]]
    per_config: dict[str, dict] = {}
    for run in report["runs"]:
        entry = per_config.setdefault(run["config"], {"runs": 0, "weights": run.get("weight_bytes_ratio"),
                                                      "failed": 0, "ratios": {c: [] for c in levels}})
        entry["runs"] += 1
        entry["failed"] += "error" in run
        for level in run.get("levels", []):
            if level.get("throughput_ratio") is not None:
                entry["ratios"][level["concurrency"]].append(level["throughput_ratio"])

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        return f"{mean(values):.2f}" + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")

    lines = ["| config | weights × baseline | runs | " + " | ".join(f"c={c}" for c in levels) + " |",
             "|---|---:|---:|" + "---:|" * len(levels)]
    for config, entry in per_config.items():
        runs = f"{entry['runs']}" + (f" ({entry['failed']} failed)" if entry["failed"] else "")
        weights = "—" if entry["weights"] is None else f"{entry['weights']:.2f}"
        lines.append(f"| {config} | {weights} | {runs} | " + " | ".join(cell(entry["ratios"][c]) for c in levels)
                     + " |")
    cpu = (report.get("provenance") or {}).get("cpu", {}).get("described")
    caption = (f"Output tokens/s over the baseline ({report['baseline']}, mean of its runs) on {report['device']}"
               f"{f' ({cpu})' if cpu else ''}; {report['load']['prompt_tokens']}-token prompts, "
               f"{report['load']['output_tokens']} output tokens.")
    return "\n".join([caption, "", *lines, "", source(name)])


def render(text: str) -> str:
    """`text` with every marked table regenerated; an unknown table name is an error."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name.startswith("serve:"):
            return f"{match.group(1)}{serve_summary_table(name.removeprefix('serve:'))}\n{match.group(4)}"
        if name not in TABLES:
            raise SystemExit(f"tables.py: unknown table {name!r} (known: {', '.join(TABLES)})")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"
    return MARKER.sub(replace, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is not what the result files give")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        path = REPO / page
        text = path.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(page)
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"tables.py: out of date with benchmarks/results: {', '.join(stale)} (run python benchmarks/tables.py)",
              file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale and not args.check else "tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
