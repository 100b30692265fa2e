"""The ranked table of a search report: plain text for the terminal, markdown for results files."""

from __future__ import annotations

COLUMNS = ("rank", "candidate", "blocks", "ppl", "ratio", "QA", "eligible", "held-out ratio")


def _cells(row: dict, baseline: dict) -> list[str]:
    holdout = row.get("holdout_ratio")
    return [str(row.get("rank", "-")), row["label"], str(row.get("num_layers", len(row["layers"]))),
            f"{row['ppl']:.3f}", f"{row['ppl'] / baseline['ppl']:.4f}", f"{row['qa_correct']}/{row['qa_total']}",
            "-" if "eligible" not in row else ("yes" if row["eligible"] else "no"),
            f"{holdout:.4f}" if holdout is not None else ("1.0000" if row["label"] == "baseline"
                                                          and baseline.get("holdout_ppl") else "")]


def table_rows(report: dict, limit: int | None = None) -> list[list[str]]:
    """Header, the baseline, then the ranked candidates (the first `limit` of them), as cell strings."""
    baseline = report["baseline"]
    rows = [list(COLUMNS), _cells({**baseline, "rank": "base"}, baseline)]
    rows += [_cells(row, baseline) for row in report["candidates"][:limit]]
    return rows


def text_table(report: dict, limit: int | None = None) -> str:
    """Aligned plain-text table."""
    rows = table_rows(report, limit)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown_table(report: dict, limit: int | None = None) -> str:
    """GitHub markdown table."""
    rows = table_rows(report, limit)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---:" if i != 1 else "---" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
