"""What `nanoq surgery --search` evaluates and how it ranks, with the command line's defaults: plain data, no
torch, so that `nanoq --help` builds its parser without importing the search."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoqError

MODES = ("drop1", "swap-adjacent", "drop1+swap")


@dataclass(frozen=True)
class SearchSettings:
    """What the search evaluates and how it ranks (the CLI's defaults are these)."""

    mode: str = "drop1"
    budget: int = 8
    ctx: int = 512
    windows: int = 8
    holdout_windows: int = 8
    confirm: int = 3
    max_qa_loss: float = 0.1
    max_new_tokens: int = 8

    def check(self) -> None:
        if self.mode not in MODES:
            raise NanoqError(f"--search {self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("budget", "windows", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise NanoqError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("holdout_windows", "confirm"):
            if getattr(self, name) < 0:
                raise NanoqError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 0 or more")
        if self.ctx < 16:
            raise NanoqError(f"--ctx {self.ctx}: windows need at least 16 tokens")
        if not 0 <= self.max_qa_loss <= 1:
            raise NanoqError(f"--max-qa-loss {self.max_qa_loss}: a fraction of the questions, 0..1")
