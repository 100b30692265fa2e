"""Real processes: a quantize stopped by SIGTERM / SIGHUP / SIGINT removes what it was writing; one killed by
SIGKILL (as by power loss) leaves a locked-then-orphaned staging folder that the next run on the same OUT
removes; a live run's staging folder is never touched; the console command's exit status and one line for a
NaN source and for a full disk. Counted in the fuzz totals (class "signals and processes")."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fuzz_totals import record as tally

from nanoq_plugin.cli import main

CLI = [sys.executable, "-m", "nanoq_plugin.cli"]
# --calib self samples 512 windows from the model: seconds of work after the staging folder appears
LONG_QUANTIZE = ("--recipe", "w4g128", "--method", "gptq", "--calib", "self", "--calib-windows", "512",
                 "--calib-seq-len", "128", "--quiet")


def record(name: str, result: str, seconds: float) -> None:
    tally(f"process-{name}", "signals and processes", "subprocess", result, seconds)


@pytest.fixture
def source(fuzz_bases, tmp_path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(fuzz_bases["llama"], copy)
    return copy


def stagings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.nanoq-tmp-*"))


def start_long_quantize(source: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A quantize of `source` into `out` in its own process, and its staging folder once it exists."""
    process = subprocess.Popen([*CLI, "quantize", source, out, *LONG_QUANTIZE], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = stagings(out)
        if found:
            time.sleep(0.5)  # into the work: the calibration text is still being sampled
            return process, found[0]
        if process.poll() is not None:
            raise AssertionError(f"quantize ended ({process.returncode}) before writing: {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("no staging folder after 240 s")


@pytest.mark.parametrize(("stop", "status", "line"), [
    (signal.SIGTERM, 128 + signal.SIGTERM, "nanoq: terminated (SIGTERM)"),
    (signal.SIGHUP, 128 + signal.SIGHUP, "nanoq: terminated (SIGHUP)"),
    (signal.SIGINT, 130, "nanoq: interrupted"),
], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stopped_quantize_leaves_nothing(stop, status, line, source, tmp_path, capfd):
    start = time.perf_counter()
    out = tmp_path / "out"
    process, staging = start_long_quantize(source, out)
    refused = None
    if stop == signal.SIGTERM:  # while it runs, a second run on the same OUT is refused and its staging kept
        capfd.readouterr()
        refused = (main(["quantize", str(source), str(out), "--recipe", "w8", "--quiet"]),
                   capfd.readouterr().err.strip())
        assert staging.is_dir()
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    ok = (process.returncode == status and err.strip().splitlines()[-1:] == [line] and "Traceback" not in err
          and not out.exists() and not stagings(out))
    if refused is not None:
        ok = ok and refused[0] == 2 and refused[1].startswith("nanoq: error:") and "another nanoq run" in refused[1]
    record(f"quantize-{stop.name}", "refused" if ok else "left files behind", time.perf_counter() - start)
    assert ok, (process.returncode, err[-2000:], refused, stagings(out), out.exists())


def test_a_killed_quantize_is_cleaned_up_by_the_next_run(source, tmp_path, capfd):
    start = time.perf_counter()
    out = tmp_path / "out"
    process, staging = start_long_quantize(source, out)
    process.kill()  # SIGKILL: nothing runs in the process; as a power loss, the folder stays
    process.communicate(timeout=60)
    left = staging.is_dir()
    capfd.readouterr()
    status = main(["quantize", str(source), str(out), "--recipe", "w8", "--quiet"])
    err = capfd.readouterr().err
    ok = (left and status == 0 and not staging.exists() and not stagings(out) and (out / "model.safetensors").is_file()
          and f"removed {staging}, left behind by an interrupted run" in err)
    record("quantize-SIGKILL-then-rerun", "refused" if ok else "left files behind", time.perf_counter() - start)
    assert ok, (left, status, err[-2000:], stagings(out))


def test_console_command_refuses_a_nan_source_in_one_line(source, tmp_path):
    start = time.perf_counter()
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][17, 3] = float("nan")
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    done = subprocess.run([*CLI, "quantize", source, tmp_path / "out", "--recipe", "w4g128", "--quiet"], capture_output=True,
                          text=True, timeout=300)
    expected = [f"nanoq: error: {source / 'model.safetensors'}: tensor 'model.layers.1.mlp.up_proj.weight' has a "
                "non-finite value (nan) at index [17, 3]"]
    ok = done.returncode == 2 and done.stderr.strip().splitlines() == expected and not (tmp_path / "out").exists()
    record("quantize-nan-console", "refused" if ok else f"exit {done.returncode}", time.perf_counter() - start)
    assert ok, (done.returncode, done.stderr[-2000:])


def test_a_full_disk_is_one_line_and_leaves_nothing(source, tmp_path):
    """The file size limit (EFBIG) stands in for a full disk (ENOSPC): both fail the write of a shard."""
    start = time.perf_counter()
    out = tmp_path / "out"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "from nanoq_plugin.cli import main; import nanoq_plugin.quantizers.pipeline; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "quantize", source, out, "--recipe", "w8", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    ok = (done.returncode == 2 and len(lines) == 1 and lines[0].startswith("nanoq: error:") and "cannot write" in lines[0]
          and not out.exists() and not stagings(out))
    record("quantize-disk-full", "refused" if ok else f"exit {done.returncode}", time.perf_counter() - start)
    assert ok, (done.returncode, done.stderr[-2000:], stagings(out))
