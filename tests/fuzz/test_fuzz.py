"""Every broken input through every command that reads it: exit status 2 and exactly one `nanoq: error:` line
(NanoqError from transformers' from_pretrained), no traceback, nothing written (no output, no staging folder,
no eval summary), the inputs untouched. Totals are printed at the end of the run (conftest)."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from fuzz_cases import EVAL_WINDOWS, Case, Workspace, all_cases
from fuzz_totals import record

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError

DEFAULT_ARGV = {
    "quantize": lambda ws: ["quantize", ws.src, ws.out, "--recipe", "w8", "--quiet"],
    "export-gguf": lambda ws: ["export", "gguf", ws.src, ws.gguf_out, "--quiet"],
    "surgery": lambda ws: ["surgery", ws.src, ws.out, "--drop", "1", "--quiet"],
    "eval-base": lambda ws: ["eval", ws.nano, "--base", ws.src, "--text", ws.text, *EVAL_WINDOWS, "--quiet"],
    "inspect": lambda ws: ["inspect", ws.nano],
    "eval": lambda ws: ["eval", ws.nano, "--text", ws.text, *EVAL_WINDOWS, "--quiet"],
    "export-ct": lambda ws: ["export", "compressed-tensors", ws.nano, ws.out],
}

RUNS = [pytest.param(case, command, id=f"{case.name}-{command}") for case in all_cases() for command in case.runs]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (folders and links marked)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def workspace(root: Path, case: Case, bases: dict[str, Path]) -> Workspace:
    ws = Workspace(root=root, src=root / "src", nano=root / "nano", text=root / "text.txt", out=root / "out",
                   gguf=root / "model.gguf")
    shutil.copytree(bases[case.float_base], ws.src)
    shutil.copytree(bases[case.nano_base], ws.nano)
    shutil.copy(bases["text"], ws.text)
    shutil.copy(bases["gguf"], ws.gguf)
    if case.mutate is not None:
        case.mutate(ws)
    return ws


def run_command(command: str, case: Case, ws: Workspace, capfd) -> tuple[int | None, str, BaseException | None]:
    """`(exit status, stderr, escaped exception)` of one command on the broken workspace, run in-process."""
    capfd.readouterr()
    if command == "from_pretrained":
        from transformers import AutoModelForCausalLM

        try:
            AutoModelForCausalLM.from_pretrained(ws.nano)
        except NanoqError as err:
            return 2, capfd.readouterr().err + f"nanoq: error: {err}\n", None
        except Exception as err:  # the outcome under test: recorded, not raised here
            return None, capfd.readouterr().err, err
        return 0, capfd.readouterr().err, None
    argv = (case.argv.get(command) or DEFAULT_ARGV[command])(ws)
    try:
        status = main([str(a) for a in argv])
    except BaseException as err:  # SystemExit or an escaped exception: recorded as the outcome
        return None, capfd.readouterr().err, err
    return status, capfd.readouterr().err, None


def outcome(status, err: str, escaped, changed: list[str], left: list[str], expect: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("nanoq: error:")]
    if escaped is not None or "Traceback" in err:
        return "traceback"
    if "nanoq: internal error" in err:
        return "internal error"
    if status == 0:
        return "succeeded"
    if status != 2:
        return f"exit {status}"
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    if changed or left:
        return "left files behind"
    if expect and expect.lower() not in errors[0].lower():
        return "error misses the name"
    return "refused"


@pytest.mark.parametrize(("case", "command"), RUNS)
def test_broken_input_is_refused_in_one_line(case: Case, command: str, fuzz_bases, tmp_path, capfd):
    start = time.perf_counter()
    root = tmp_path / "ws"
    root.mkdir()
    ws = workspace(root, case, fuzz_bases)
    outside = ws.out if root not in ws.out.parents else None
    before = snapshot(root)
    status, err, escaped = run_command(command, case, ws, capfd)
    after = snapshot(root)
    changed = sorted(set(before.items()) ^ set(after.items()))
    left = []
    if outside is not None:
        left = [str(p) for p in (outside, ws.gguf_out) if p.exists()]
        left += [str(p) for p in outside.parent.glob(f".{outside.name}*.nanoq-tmp-*")]
    result = outcome(status, err, escaped, changed, left, case.expect)
    record(case.name, case.group, command, result, time.perf_counter() - start)
    assert result == "refused", (f"{case.group} / {case.name} / {command}: {result}; status {status}; "
                                 f"escaped {escaped!r}; changed {changed[:4]}; left {left}; stderr:\n{err[-3000:]}")
