"""The serving comparison's report: ratios to the baseline measured in the same run, a markdown table and
PNG plots (matplotlib).

Input is the list of runs `benchmarks/serve_load.py` measured, each
`{"config", "run", "levels": [summarize dicts], "peak_rss_bytes", "weight_bytes", ...}`; the baseline
configuration runs first and last, and its ratios use the mean of its runs at each concurrency.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

THROUGHPUT = "output_tokens_per_s"


def _level(run: dict, concurrency: int) -> dict | None:
    return next((lv for lv in run.get("levels", []) if lv["concurrency"] == concurrency), None)


def baseline_reference(runs: list[dict], baseline: str) -> dict:
    """Per concurrency, the mean over the baseline's runs of throughput, TTFT/TPOT p50, and their spread
    `(max - min) / mean` of throughput; plus the baseline's mean peak RSS and its weight bytes."""
    base_runs = [r for r in runs if r["config"] == baseline and r.get("levels")]
    if not base_runs:
        raise ValueError(f"the baseline {baseline} has no completed run: no ratio can be computed")
    reference = {"levels": {}, "runs": len(base_runs)}
    for level in base_runs[0]["levels"]:
        c = level["concurrency"]
        values = [lv for lv in (_level(r, c) for r in base_runs) if lv and lv["completed"]]
        if not values:
            continue
        throughputs = [lv[THROUGHPUT] for lv in values]
        reference["levels"][c] = {
            THROUGHPUT: mean(throughputs),
            "spread": (max(throughputs) - min(throughputs)) / mean(throughputs),
            "ttft_ms_p50": mean(lv["ttft_ms_p50"] for lv in values),
            "tpot_ms_p50": mean(lv["tpot_ms_p50"] for lv in values),
        }
    reference["peak_rss_bytes"] = mean(r["peak_rss_bytes"] for r in base_runs)
    reference["weight_bytes"] = base_runs[0]["weight_bytes"]
    return reference


def add_ratios(runs: list[dict], baseline: str) -> dict:
    """Add `*_ratio` fields (ours / baseline's) to every run and level in place; returns the baseline reference."""
    reference = baseline_reference(runs, baseline)
    for run in runs:
        run["peak_rss_ratio"] = round(run["peak_rss_bytes"] / reference["peak_rss_bytes"], 3) if run.get(
            "peak_rss_bytes") and reference["peak_rss_bytes"] else None
        run["weight_bytes_ratio"] = round(run["weight_bytes"] / reference["weight_bytes"], 3)
        for level in run.get("levels", []):
            ref = reference["levels"].get(level["concurrency"])
            ok = ref is not None and level["completed"] > 0
            level["throughput_ratio"] = round(level[THROUGHPUT] / ref[THROUGHPUT], 3) if ok else None
            level["tpot_p50_ratio"] = round(level["tpot_ms_p50"] / ref["tpot_ms_p50"], 3) if ok and level[
                "tpot_ms_p50"] else None
            level["ttft_p50_ratio"] = round(level["ttft_ms_p50"] / ref["ttft_ms_p50"], 3) if ok and level[
                "ttft_ms_p50"] else None
    return reference


def _fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The report as markdown: one row per run and concurrency, ratios to the baseline beside each figure."""
    baseline = report["baseline"]
    lines = [
        f"# Serving load test — {report['model']} on {report['device']}",
        "",
        f"Engine: {report['engine']}. Baseline: **{baseline}** (ran first and last; ratios are to the mean of its "
        f"runs). Load: random token-id prompts of {report['load']['prompt_tokens']} tokens, "
        f"{report['load']['output_tokens']} output tokens (ignore_eos, greedy), prefix caching off.",
        *([f"CPU: {cpu['described']}, commit {report['provenance']['commit'][:10]}"
           f"{' (uncommitted changes)' if report['provenance']['dirty'] else ''}, {report['provenance']['date']}."]
          if (cpu := report.get("provenance", {}).get("cpu")) else []),
        "",
        "| config | run | conc. | out tok/s | × baseline | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
        "| errors | peak RSS GiB | × | weights MiB | × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        if not run.get("levels"):
            lines.append(f"| {run['config']} | {run['run']} | — | failed: {run.get('error', '?')[:160]} "
                         f"| | | | | | | | {run['weight_bytes'] / 2**20:.1f} | {_fmt(run['weight_bytes_ratio'], 2)} |")
            continue
        for level in run["levels"]:
            lines.append(
                f"| {run['config']} | {run['run']} | {level['concurrency']} | {_fmt(level[THROUGHPUT])} | "
                f"{_fmt(level['throughput_ratio'], 2)} | {_fmt(level['requests_per_s'], 2)} | "
                f"{_fmt(level['ttft_ms_p50'], 0)} / {_fmt(level['ttft_ms_p99'], 0)} | "
                f"{_fmt(level['tpot_ms_p50'])} / {_fmt(level['tpot_ms_p99'])} | {level['errors']} | "
                f"{run['peak_rss_bytes'] / 2**30:.2f} | {_fmt(run['peak_rss_ratio'], 2)} | "
                f"{run['weight_bytes'] / 2**20:.1f} | {_fmt(run['weight_bytes_ratio'], 2)} |")
    spread = ", ".join(f"c={c}: {v['spread']:.0%}" for c, v in report["baseline_reference"]["levels"].items())
    lines += ["", f"Baseline spread between its runs (throughput, (max − min) / mean): {spread}.", ""]
    lines += summary_table(report)
    if report.get("reliability"):
        rel = report["reliability"]
        load = rel["load"]
        refused = ", ".join(f"{m['request']}: {m['status']}" for m in rel["malformed"])
        lines += ["", f"Reliability ({rel['config']}): {load['requests']} requests at concurrency "
                      f"{load['concurrency']}: {load['completed']} complete, {load['errors']} failed; malformed "
                      f"requests answered {refused}; serving afterwards: {rel['serving_after']}; "
                      f"{'PASSED' if rel['passed'] else 'FAILED'} in {rel['seconds']} s."]
    if report.get("notes"):
        lines += [""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "The same load with vLLM's own tool (one concurrency level):", "",
              "```", report["vllm_bench_command"], "```", ""]
    return "\n".join(lines)


def summary_table(report: dict) -> list[str]:
    """Markdown lines: per config, the mean throughput ratio to the baseline at each concurrency over its runs,
    with the lowest and highest run where it ran more than once."""
    levels = [int(c) for c in report["baseline_reference"]["levels"]]
    ratios: dict[str, dict[int, list[float]]] = {}
    for run in report["runs"]:
        per_level = ratios.setdefault(run["config"], {c: [] for c in levels})
        for level in run.get("levels", []):
            if level.get("throughput_ratio") is not None and level["concurrency"] in per_level:
                per_level[level["concurrency"]].append(level["throughput_ratio"])

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        text = f"{mean(values):.2f}"
        return text + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")

    lines = ["Output tokens/s over the baseline's mean, mean of each config's runs (lowest–highest run):", "",
             "| config | runs | " + " | ".join(f"c={c}" for c in levels) + " |",
             "|---|---:|" + "---:|" * len(levels)]
    for config, per_level in ratios.items():
        runs = sum(1 for run in report["runs"] if run["config"] == config)
        lines.append(f"| {config} | {runs} | " + " | ".join(cell(per_level[c]) for c in levels) + " |")
    return lines


def _ratio_axes(ax, ylabel: str, title: str, log2_x: bool = True) -> None:
    """Axes of a ratio plot: the 1.0 line (equal to the baseline), labels, legend."""
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    if log2_x:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _save(fig, prefix: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = prefix.with_name(f"{prefix.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(report: dict, prefix: Path) -> list[Path]:
    """Three PNGs beside `prefix`: throughput ratio vs concurrency, latency vs throughput, memory bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = report["baseline"]
    runs = [r for r in report["runs"] if r.get("levels")]
    label = lambda run: f"{run['config']} (run {run['run']})"  # noqa: E731

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = [(lv["concurrency"], lv["throughput_ratio"]) for lv in run["levels"] if lv["throughput_ratio"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=label(run), linewidth=2.5 if run["config"] == baseline else 1.5)
    _ratio_axes(ax, f"output tokens/s ÷ {baseline}", f"Throughput relative to {baseline} (same run), "
                f"{report['device']}")
    throughput = _save(fig, prefix, "throughput")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in runs:
        levels = [lv for lv in run["levels"] if lv["tpot_ms_p50"]]
        left.plot([lv[THROUGHPUT] for lv in levels], [lv["tpot_ms_p50"] for lv in levels], marker="o",
                  label=label(run))
        ratios = [(lv["concurrency"], lv["tpot_p50_ratio"]) for lv in levels if lv["tpot_p50_ratio"]]
        if ratios:
            right.plot(*zip(*ratios), marker="o", label=label(run))
    left.set_xlabel("output tokens/s")
    left.set_ylabel("TPOT p50 (ms)")
    left.set_title("Latency vs throughput (points: concurrency 1 → 64)")
    _ratio_axes(right, f"TPOT p50 ÷ {baseline}", "Per-token latency relative to the baseline")
    latency = _save(fig, prefix, "latency")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(report["runs"]))
    ax.bar([i - 0.2 for i in x], [r.get("peak_rss_ratio") or 0 for r in report["runs"]], width=0.4,
           label="peak RSS of the server processes")
    ax.bar([i + 0.2 for i in x], [r["weight_bytes_ratio"] for r in report["runs"]], width=0.4, label="weight bytes")
    ax.set_xticks(list(x), [f"{r['config']}\n(run {r['run']})" for r in report["runs"]], fontsize=7)
    _ratio_axes(ax, f"÷ {baseline}", "Memory relative to the baseline", log2_x=False)
    memory = _save(fig, prefix, "memory")
    return [throughput, latency, memory]
