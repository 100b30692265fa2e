"""What the fuzz runs found, tallied across the session and printed at its end (conftest)."""

from __future__ import annotations

from collections import Counter, defaultdict

# outcome -> count, under "all", "class:<class of breakage>" and "command:<command>"
TOTALS: dict[str, Counter] = defaultdict(Counter)
SECONDS: list[float] = []
CASES: set[str] = set()


def record(case: str, group: str, command: str, outcome: str, seconds: float) -> None:
    CASES.add(case)
    SECONDS.append(seconds)
    for key in ("all", f"class:{group}", f"command:{command}"):
        TOTALS[key][outcome] += 1
