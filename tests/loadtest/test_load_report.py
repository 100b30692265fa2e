"""The load test's statistics and report on records built by hand (no server): percentiles, what counts as a
failed request, ratios to the mean of the baseline's runs, the markdown table and the plots."""

from pathlib import Path

import numpy as np
import pytest

from nanoq_plugin.loadtest.load_client import LoadSpec, RequestRecord, percentile, random_prompts, summarize
from nanoq_plugin.loadtest.serve_report import add_ratios, markdown_table, write_plots


def test_percentile_matches_numpy_linear():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 50) is None


def test_random_prompts_are_fixed_by_the_seed_and_in_range():
    a, b = random_prompts(3, 17, 5000, seed=4), random_prompts(3, 17, 5000, seed=4)
    assert a == b and a != random_prompts(3, 17, 5000, seed=5)
    assert all(len(p) == 17 and all(1000 <= t < 5000 for t in p) for p in a)


def test_summarize_counts_failed_requests_and_excludes_them_from_latency():
    spec = LoadSpec(concurrency=2, requests=3, prompt_tokens=8, output_tokens=5)
    records = [RequestRecord(ttft=0.1, latency=0.5, output_tokens=5, finish_reason="length"),
               RequestRecord(ttft=0.3, latency=1.1, output_tokens=5, finish_reason="length"),
               RequestRecord(ttft=9.0, latency=9.9, output_tokens=2, error="incomplete: 2 of 5 tokens")]
    summary = summarize(records, wall_seconds=2.0, spec=spec)
    assert summary["completed"] == 2 and summary["errors"] == 1
    assert summary["output_tokens_per_s"] == 5.0  # 10 tokens of the complete requests in 2 s
    assert summary["ttft_ms_p50"] == pytest.approx(200.0)
    assert summary["tpot_ms_p50"] == pytest.approx(((0.4 / 4) + (0.8 / 4)) / 2 * 1000)
    assert summary["first_errors"] == ["incomplete: 2 of 5 tokens"]


def _run(config, run, throughputs, rss, weights, tpot=10.0):
    levels = [{"concurrency": c, "completed": 4, "errors": 0, "output_tokens_per_s": t, "requests_per_s": 1.0,
               "ttft_ms_p50": 100.0, "ttft_ms_p99": 150.0, "tpot_ms_p50": tpot, "tpot_ms_p99": tpot * 2}
              for c, t in zip((1, 4), throughputs)]
    return {"config": config, "run": run, "levels": levels, "peak_rss_bytes": rss, "weight_bytes": weights}


def test_ratios_are_to_the_mean_of_the_baseline_runs(tmp_path):
    runs = [_run("base8", 1, (10.0, 30.0), 2**30, 100), _run("ours", 1, (15.0, 60.0), 2**29, 50, tpot=5.0),
            _run("base8", 2, (14.0, 50.0), 2**30, 100), _run("ours", 2, (9.0, 40.0), 2**29, 50),
            {"config": "broken", "run": 1, "levels": [], "error": "exited", "weight_bytes": 25}]
    reference = add_ratios(runs, "base8")
    assert reference["levels"][1]["output_tokens_per_s"] == 12.0
    assert reference["levels"][4]["spread"] == pytest.approx(20 / 40)
    ours = runs[1]
    assert [lv["throughput_ratio"] for lv in ours["levels"]] == [1.25, 1.5]
    assert ours["levels"][0]["tpot_p50_ratio"] == 0.5 and ours["peak_rss_ratio"] == 0.5
    assert ours["weight_bytes_ratio"] == 0.5 and runs[4]["weight_bytes_ratio"] == 0.25
    report = {"model": "m", "device": "cpu", "engine": "vLLM", "baseline": "base8", "runs": runs,
              "load": {"prompt_tokens": 8, "output_tokens": 5},
              "baseline_reference": reference, "vllm_bench_command": "vllm bench serve ...", "notes": ["n"]}
    table = markdown_table(report)
    assert "| ours | 1 | 4 | 60.0 | 1.50 |" in table and "failed: exited" in table and "c=4: 50%" in table
    # the summary: ours ran twice (ratios 1.25 / 0.75 at c=1, 1.5 / 1.0 at c=4), the baseline twice, broken never
    assert "| ours | 2 | 1.00 (0.75–1.25) | 1.25 (1.00–1.50) |" in table
    assert "| base8 | 2 | 1.00 (0.83–1.17) | 1.00 (0.75–1.25) |" in table and "| broken | 1 | — | — |" in table
    paths = write_plots(report, tmp_path / "serve")
    assert [p.name for p in paths] == ["serve-throughput.png", "serve-latency.png", "serve-memory.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_a_baseline_without_a_completed_run_is_an_error():
    with pytest.raises(ValueError, match="baseline base8 has no completed run"):
        add_ratios([{"config": "base8", "run": 1, "levels": [], "weight_bytes": 1}], "base8")


def test_socket_folder_fits_a_unix_socket_address_for_any_state_folder(tmp_path):
    from nanoq_plugin.loadtest.vllm_process import IPC_NAME_LENGTH, IPC_PATH_MAX, release_rpc_dir, rpc_dir, server_env

    assert rpc_dir(Path("/tmp/state")) == Path("/tmp/state/rpc")  # short enough: kept inside the state folder
    short = tmp_path / "s"
    deep = tmp_path / ("d" * 60) / "work" / "state"
    for state in (short, deep):
        sockets = rpc_dir(state)
        assert len(str(sockets)) + IPC_NAME_LENGTH <= IPC_PATH_MAX
        assert rpc_dir(state) == sockets  # the same state folder gets the same socket folder
        env = server_env(state)
        assert env["VLLM_RPC_BASE_PATH"] == str(sockets) and sockets.is_dir()
    assert rpc_dir(deep) != deep / "rpc" and rpc_dir(deep) != rpc_dir(tmp_path / ("e" * 60) / "state")
    release_rpc_dir(deep)  # a stopped server's socket folder outside its state folder is removed
    assert not rpc_dir(deep).exists()
    release_rpc_dir(short)  # one inside the state folder goes with the state folder
    assert rpc_dir(short).is_dir()


def test_memory_peak_of_a_window_shorter_than_the_sampling_period_is_measured():
    import os

    from nanoq_plugin.loadtest.vllm_process import MemorySampler

    sampler = MemorySampler(os.getpid(), sample_seconds=3600)  # the thread samples once, then sleeps
    try:
        start = sampler.mark()
        assert sampler.peak_since(start) > 2**20  # this Python process holds more than 1 MiB
    finally:
        sampler.stop()


def test_a_baseline_without_a_memory_figure_gives_no_memory_ratio():
    level = {"concurrency": 1, "completed": 1, "output_tokens_per_s": 10.0, "ttft_ms_p50": 1.0, "tpot_ms_p50": 1.0}
    runs = [{"config": "base", "run": 1, "levels": [dict(level)], "peak_rss_bytes": 0, "weight_bytes": 2},
            {"config": "ours", "run": 1, "levels": [dict(level)], "peak_rss_bytes": 5, "weight_bytes": 1}]
    add_ratios(runs, "base")
    assert runs[1]["peak_rss_ratio"] is None and runs[1]["weight_bytes_ratio"] == 0.5
