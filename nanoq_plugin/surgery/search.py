"""`nanoq surgery SRC [OUT] --search MODE`: evaluate surgery candidates in memory, rank them, keep the best.

Protocol. The text is tokenized once; its first `windows` non-overlapping windows of `ctx` tokens are the
search slice and the next `holdout_windows` windows the held-out slice. Every candidate (and the baseline,
the unmodified model) is scored on the search slice by perplexity and on the question suite (`qa`). The
model is loaded once, in float32; a candidate is the same model with its blocks rearranged (`inmemory`).

Ranking. A candidate is eligible when its question-suite accuracy is at least the baseline's minus
`max_qa_loss`. Eligible candidates come first, each group ordered by the perplexity ratio to the baseline
on the search slice (lower is better), ties by more questions right, then by label. The best is rank 1.
Because it was selected on the search slice, its ratio there is optimistic (the winner's curse): the top
`confirm` candidates and the baseline are re-scored on the held-out slice, which is what the table's
"held-out" column reports and what should be quoted.

Every evaluation is appended to the cache as soon as it is done (`cache`), so an interrupted or
extended search (a larger `--budget`) re-evaluates nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..errors import NanoqError
from ..eval.perplexity import evaluate_perplexity
from ..format.checkpoint import write_json
from .apply import open_float_source, write_surgery
from .cache import EvalCache, file_digest
from .candidates import block_influence, drop_one, stage_budgets, swap_adjacent
from .inmemory import surgered
from .plan import LayerMap, build_layer_map
from .qa import DEFAULT_QA_FILE, answer_questions, load_questions, score_answers, suite_fingerprint
from .settings import SearchSettings


def _model_identity(source) -> dict:
    files = sorted(source.directory.glob("*.safetensors"))
    return {"config": file_digest(source.directory / "config.json"),
            "weights": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def _slices(tokenizer, text_file: Path, settings: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        text = text_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise NanoqError(f"--text {text_file}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start})") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    search_end = settings.windows * settings.ctx
    needed = search_end + settings.holdout_windows * settings.ctx
    if ids.numel() < needed:
        raise NanoqError(f"--text {text_file}: {ids.numel()} tokens; {settings.windows} search and "
                         f"{settings.holdout_windows} held-out windows of {settings.ctx} need {needed}")
    return ids[:search_end], ids[search_end:needed]


class _Evaluator:
    """Scores layer maps on the loaded model, through the cache."""

    def __init__(self, model, tokenizer, questions, search_ids, holdout_ids, settings: SearchSettings,
                 cache: EvalCache) -> None:
        self.model, self.tokenizer, self.questions = model, tokenizer, questions
        self.search_ids, self.holdout_ids, self.settings, self.cache = search_ids, holdout_ids, settings, cache
        self.new_evaluations = 0  # search-slice evaluations run now (not from the cache)
        self.new_holdout_evaluations = 0

    def _perplexity(self, ids: torch.Tensor) -> tuple[float, int]:
        result = evaluate_perplexity({"m": self.model}, ids, self.settings.ctx, self.settings.ctx, progress=False)
        return result.perplexity["m"], result.scored_tokens

    def search(self, layer_map: LayerMap) -> dict:
        """`{"ppl", "scored_tokens", "qa_correct", "qa_total", "answers", "layers", "seconds"}`, cached."""
        label = layer_map.label()
        if (record := self.cache.get("search", label)) is not None:
            return record
        start = time.perf_counter()
        with surgered(self.model, layer_map):
            ppl, tokens = self._perplexity(self.search_ids)
            answers = answer_questions(self.model, self.tokenizer, self.questions, self.settings.max_new_tokens)
        scored = score_answers(self.questions, answers)
        self.new_evaluations += 1
        return self.cache.put("search", label, {
            "layers": list(layer_map.sources), "ppl": ppl, "scored_tokens": tokens, "qa_correct": scored["correct"],
            "qa_total": scored["total"], "answers": answers, "seconds": round(time.perf_counter() - start, 2)})

    def holdout(self, layer_map: LayerMap) -> dict:
        """`{"ppl", "scored_tokens"}` on the held-out slice, cached per held-out window count."""
        kind = f"holdout{self.settings.holdout_windows}"
        if (record := self.cache.get(kind, layer_map.label())) is not None:
            return record
        with surgered(self.model, layer_map):
            ppl, tokens = self._perplexity(self.holdout_ids)
        self.new_holdout_evaluations += 1
        return self.cache.put(kind, layer_map.label(), {"ppl": ppl, "scored_tokens": tokens})

    def influence(self) -> list[float]:
        if (record := self.cache.get("proxy", "block-influence")) is not None:
            return record["influence"]
        values = block_influence(self.model, self.search_ids[: self.settings.ctx].unsqueeze(0))
        return self.cache.put("proxy", "block-influence", {"influence": values})["influence"]


def rank_candidates(baseline: dict, rows: list[dict], max_qa_loss: float) -> list[dict]:
    """`rows` (each with "label", "ppl", "qa_correct", "qa_total") ranked by the rule in the module doc;
    adds "ppl_ratio", "qa_accuracy", "eligible" and "rank" to copies of them."""
    floor = baseline["qa_correct"] / baseline["qa_total"] - max_qa_loss
    ranked = []
    for row in rows:
        accuracy = row["qa_correct"] / row["qa_total"]
        ranked.append({**row, "ppl_ratio": row["ppl"] / baseline["ppl"], "qa_accuracy": accuracy,
                       "eligible": accuracy >= floor - 1e-9})
    ranked.sort(key=lambda r: (not r["eligible"], r["ppl_ratio"] if math.isfinite(r["ppl_ratio"]) else math.inf,
                               -r["qa_correct"], r["label"]))
    for position, row in enumerate(ranked, start=1):
        row["rank"] = position
    return ranked


def _row(layer_map: LayerMap, record: dict, stage: int) -> dict:
    return {"label": layer_map.label(), "stage": stage, "num_layers": layer_map.num_layers,
            "ops": {k: v for k, v in layer_map.to_dict().items() if k in ("drop", "swap", "duplicate")},
            **{k: record[k] for k in ("layers", "ppl", "scored_tokens", "qa_correct", "qa_total", "answers", "seconds")}}


def _evaluate_stages(evaluator: _Evaluator, baseline: dict, influence: list[float], n: int,
                     settings: SearchSettings, progress: bool) -> list[dict]:
    """Evaluate the candidates of `settings.mode` within the budget, in proxy order; one row per candidate."""
    first = swap_adjacent(n, influence) if settings.mode == "swap-adjacent" else drop_one(n, influence)
    budget_first, budget_second = stage_budgets(settings.mode, settings.budget, len(first))
    rows: list[dict] = []
    with tqdm(total=min(budget_first, len(first)) + min(budget_second, n - 2), desc="surgery search",
              unit="candidate", disable=not progress) as bar:
        for layer_map in first[:budget_first]:
            rows.append(_row(layer_map, evaluator.search(layer_map), stage=1))
            bar.update()
        if budget_second:
            best_drop = rank_candidates(baseline, rows, settings.max_qa_loss)[0]["ops"]["drop"][0]
            for layer_map in swap_adjacent(n, influence, dropped=best_drop)[:budget_second]:
                rows.append(_row(layer_map, evaluator.search(layer_map), stage=2))
                bar.update()
    return rows


def _protocol(text_path: Path, qa_path: Path, questions: int, search_ids, holdout_ids, settings: SearchSettings) -> dict:
    search_end = int(search_ids.numel())
    return {"text": str(text_path.resolve()), "qa": str(qa_path.resolve()), "qa_questions": questions,
            "search_slice": {"tokens": [0, search_end], "windows": settings.windows, "ctx": settings.ctx,
                             "stride": settings.ctx},
            "holdout_slice": {"tokens": [search_end, search_end + int(holdout_ids.numel())],
                              "windows": settings.holdout_windows},
            "dtype": "float32", "nanoq": __version__,
            "ranking": "eligible (QA accuracy >= baseline - max_qa_loss) first; then perplexity ratio to "
                       "baseline on the search slice; then more QA correct; then label"}


def run_search(source_dir: str, text_file: str, settings: SearchSettings, json_out: str | Path,
               cache_path: str | Path | None = None, qa_file: str | Path | None = None,
               output_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run the search on `source_dir`; write the report to `json_out` (and the best model to `output_dir`).

    Returns the report: settings, protocol, baseline, proxy, ranked candidates, best, and how many
    evaluations ran now (`new_evaluations` on the search slice, baseline included, and
    `new_holdout_evaluations`) rather than coming from the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings.check()
    start = time.perf_counter()
    source = open_float_source(source_dir)
    text_path = Path(text_file)
    if not text_path.is_file():
        raise NanoqError(f"--text {text_file}: file not found")
    qa_path = Path(qa_file) if qa_file else DEFAULT_QA_FILE
    questions = load_questions(qa_path)
    if output_dir is not None and Path(output_dir).exists() and (not Path(output_dir).is_dir()
                                                                 or any(Path(output_dir).iterdir())):
        raise NanoqError(f"{output_dir}: already exists and is not empty (remove it or choose another OUT)")
    json_out = Path(json_out)
    cache_path = Path(cache_path) if cache_path else json_out.with_suffix(".cache.jsonl")

    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    search_ids, holdout_ids = _slices(tokenizer, text_path, settings)
    fingerprinted = {"model": _model_identity(source), "text": file_digest(text_path), "ctx": settings.ctx,
                     "windows": settings.windows, "qa": suite_fingerprint(questions),
                     "max_new_tokens": settings.max_new_tokens, "dtype": "float32",
                     "versions": {"torch": torch.__version__, "transformers": _transformers_version()}}
    cache = EvalCache(cache_path, fingerprinted)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    evaluator = _Evaluator(model, tokenizer, questions, search_ids, holdout_ids, settings, cache)

    n = source.config["num_hidden_layers"]
    identity = build_layer_map(n)
    baseline = {"label": "baseline", **evaluator.search(identity)}
    influence = evaluator.influence()
    ranked = rank_candidates(baseline, _evaluate_stages(evaluator, baseline, influence, n, settings, progress),
                             settings.max_qa_loss)
    baseline_holdout = evaluator.holdout(identity) if settings.holdout_windows else None
    for row in ranked[: settings.confirm if baseline_holdout else 0]:
        held = evaluator.holdout(_map_of(n, row))
        row["holdout_ppl"], row["holdout_ratio"] = held["ppl"], held["ppl"] / baseline_holdout["ppl"]
    best = ranked[0]
    report = {
        "source": str(source.directory.resolve()),
        "settings": asdict(settings),
        "protocol": _protocol(text_path, qa_path, len(questions), search_ids, holdout_ids, settings),
        "baseline": {**baseline, "holdout_ppl": baseline_holdout["ppl"] if baseline_holdout else None},
        "proxy": {"name": "block influence (1 - cos(h_in, h_out)) on the first search window",
                  "influence": influence},
        "candidates": ranked,
        "best": best["label"],
        "best_beats_baseline": bool(best["eligible"] and best["ppl_ratio"] < 1
                                    and best["qa_correct"] >= baseline["qa_correct"]),
        "evaluated": len(ranked),
        "new_evaluations": evaluator.new_evaluations,
        "new_holdout_evaluations": evaluator.new_holdout_evaluations,
        "cache": str(cache_path.resolve()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if output_dir is not None:
        report["output"] = str(write_surgery(source.directory, output_dir, _map_of(n, best), progress=progress))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_out, report)
    return report


def _map_of(num_layers: int, row: dict) -> LayerMap:
    ops = row["ops"]
    return build_layer_map(num_layers, drop=ops["drop"], swap=[tuple(p) for p in ops["swap"]], duplicate=ops["duplicate"])


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
