"""The fuzz suite's bases (built once) and its totals, printed at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_models import TEXT, float_model, nano_model, write_tokenizer
from fuzz_totals import CASES, SECONDS, TOTALS


@pytest.fixture(scope="session")
def fuzz_bases(tmp_path_factory) -> dict[str, Path]:
    """The unbroken inputs every case copies: float models, nano checkpoints of them, a GGUF file, a text."""
    from nanoq_plugin.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("fuzz-bases")
    tokenizer = write_tokenizer(root / "tokenizer")
    llama = float_model(root / "llama", tokenizer)
    qwen3 = float_model(root / "qwen3-tied", tokenizer, "qwen3", tied=True)
    (root / "text.txt").write_text(TEXT)
    export_gguf(llama, root / "llama.gguf", progress=False)
    return {
        "gguf": root / "llama.gguf",
        "llama": llama, "qwen3-tied": qwen3, "text": root / "text.txt",
        "w4": nano_model(llama, root / "nano-w4", "w4g128"),
        "tied": nano_model(qwen3, root / "nano-tied", "w8a8-embed"),
        "nvfp4": nano_model(llama, root / "nano-nvfp4", "nvfp4"),
    }


def pytest_terminal_summary(terminalreporter):
    runs = TOTALS.get("all")
    if not runs:
        return
    write = terminalreporter.write_line
    cases = len(CASES)
    total = sum(runs.values())
    write(f"fuzz: {cases} broken inputs x their commands = {total} runs in {sum(SECONDS):.0f} s; outcomes: "
          + ", ".join(f"{outcome} {count}" for outcome, count in runs.most_common()))
    for title, prefix in (("by class", "class:"), ("by command", "command:")):
        rows = sorted(key for key in TOTALS if key.startswith(prefix))
        write(f"fuzz {title}: " + "; ".join(
            f"{key.removeprefix(prefix)} " + "/".join(f"{o} {c}" for o, c in TOTALS[key].most_common())
            for key in rows))
