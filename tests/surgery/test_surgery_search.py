"""The search on a tiny model: candidates and proxy order, ranking rule, cache reuse and resume, the report."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.surgery.cache import EvalCache
from nanoq_plugin.surgery.candidates import block_influence, drop_one, stage_budgets, swap_adjacent
from nanoq_plugin.surgery.search import rank_candidates, run_search
from nanoq_plugin.surgery.settings import SearchSettings

TINY = dict(ctx=64, windows=2, holdout_windows=1, confirm=1, max_new_tokens=3)


def row(label, ppl, correct, total=10):
    return {"label": label, "ppl": ppl, "qa_correct": correct, "qa_total": total}


def test_ranking_rule():
    baseline = row("baseline", 10.0, 8)
    ranked = rank_candidates(baseline, [row("a", 9.0, 6), row("b", 10.5, 7), row("c", 10.5, 8), row("d", 12.0, 9),
                                        row("e", float("nan"), 8)], max_qa_loss=0.1)
    # a loses 2 of 10 questions (more than 0.1): ineligible, ranked after every eligible one despite its perplexity
    assert [r["label"] for r in ranked] == ["c", "b", "d", "e", "a"]
    assert [r["eligible"] for r in ranked] == [True, True, True, True, False]
    assert ranked[0]["ppl_ratio"] == pytest.approx(1.05) and ranked[0]["rank"] == 1


def test_candidates_and_proxy_order():
    influence = [0.9, 0.1, 0.3, 0.05, 0.2]
    assert [m.label() for m in drop_one(5, influence)] == ["drop3", "drop1", "drop4", "drop2", "drop0"]
    assert [m.label() for m in swap_adjacent(5, influence)] == ["swap3:4", "swap2:3", "swap1:2", "swap0:1"]
    after_drop = swap_adjacent(5, influence, dropped=3)  # 2 and 4 are neighbours once 3 is gone
    assert [m.label() for m in after_drop] == ["drop3+swap1:2", "drop3+swap2:4", "drop3+swap0:1"]
    assert after_drop[1].sources == (0, 1, 4, 2)
    assert stage_budgets("drop1+swap", 7, 30) == (4, 3) and stage_budgets("drop1+swap", 50, 30) == (25, 25)
    assert stage_budgets("drop1+swap", 70, 30) == (30, 40)  # deletions are 30: the rest goes to exchanges
    assert stage_budgets("drop1", 7, 30) == (7, 0)
    with pytest.raises(NanoqError, match=r"--budget 0: evaluate at least one candidate"):
        stage_budgets("drop1", 0, 30)


def test_block_influence_is_one_minus_cosine(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, block 0 output, ... (last normed)
        block1_in = hidden[1]
        block1_out = model.model.layers[1](block1_in, position_embeddings=model.model.rotary_emb(block1_in, torch.arange(20)[None]))
    block1_out = block1_out[0] if isinstance(block1_out, tuple) else block1_out
    expected = 1 - torch.nn.functional.cosine_similarity(block1_in[0], block1_out[0], dim=-1).mean().item()
    influence = block_influence(model, ids)
    assert len(influence) == 2 and influence[1] == pytest.approx(expected, rel=1e-4)
    assert influence[0] == pytest.approx(1 - torch.nn.functional.cosine_similarity(hidden[0][0], hidden[1][0], dim=-1).mean().item(), rel=1e-4)


def test_cache_skips_other_settings_and_a_truncated_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = EvalCache(path, {"windows": 2})
    cache.put("search", "drop1", {"ppl": 3.0})
    EvalCache(path, {"windows": 3}).put("search", "drop1", {"ppl": 4.0})
    with open(path, "ab") as handle:
        handle.write(b'{"settings": "x", "kind": "search", "lab')  # interrupted append
    reopened = EvalCache(path, {"windows": 2})
    assert reopened.get("search", "drop1")["ppl"] == 3.0 and reopened.get("search", "drop2") is None
    reopened.put("search", "drop2", {"ppl": 5.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)  # the partial line was replaced
    path.write_text("garbage\n" + path.read_text())
    with pytest.raises(NanoqError, match=r"cache.jsonl:1: not a valid cache record"):
        EvalCache(path, {"windows": 2})


def test_search_resumes_from_its_cache(tiny_chat_model, short_text, tmp_path):
    report_path, cache = tmp_path / "r.json", tmp_path / "c.jsonl"
    first = run_search(tiny_chat_model, short_text, SearchSettings(mode="drop1", budget=2, **TINY), report_path,
                       cache_path=cache, progress=False)
    assert first["evaluated"] == 2 and first["new_evaluations"] == 3  # baseline + 2 candidates
    second = run_search(tiny_chat_model, short_text, SearchSettings(mode="drop1", budget=3, **TINY), report_path,
                        cache_path=cache, progress=False)
    assert second["evaluated"] == 3 and second["new_evaluations"] == 1
    by_label = {r["label"]: r for r in second["candidates"]}
    for candidate in first["candidates"]:  # cached scores are reused as they were
        assert by_label[candidate["label"]]["ppl"] == candidate["ppl"]
    influence = second["proxy"]["influence"]
    assert [r["label"] for r in sorted(second["candidates"], key=lambda r: influence[r["ops"]["drop"][0]])] == \
        [m.label() for m in drop_one(4, influence)[:3]]  # the budget went to the proxy's favourites
    assert json.loads(report_path.read_text())["best"] == second["best"] == second["candidates"][0]["label"]
    other = run_search(tiny_chat_model, short_text, SearchSettings(mode="drop1", budget=1, **{**TINY, "windows": 1}),
                       report_path, cache_path=cache, progress=False)
    assert other["new_evaluations"] == 2  # other windows: nothing reused


def test_drop_then_swap_search_writes_the_best(tiny_chat_model, short_text, tmp_path, capsys):
    out = tmp_path / "best"
    args = ["surgery", tiny_chat_model, out, "--search", "drop1+swap", "--budget", "4", "--text", short_text,
            "--json", tmp_path / "r.json", "--ctx", "64", "--windows", "2", "--holdout-windows", "1",
            "--max-new-tokens", "3", "--quiet"]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    stages = [r["stage"] for r in report["candidates"]]
    assert sorted(stages) == [1, 1, 2, 2]
    stage_one = rank_candidates(report["baseline"], [r for r in report["candidates"] if r["stage"] == 1], 0.1)
    best_drop = stage_one[0]["ops"]["drop"]
    assert all(r["ops"]["drop"] == best_drop and len(r["ops"]["swap"]) == 1
               for r in report["candidates"] if r["stage"] == 2)
    assert "rank" in printed and "baseline" in printed and f"best: {report['best']}" in printed
    assert report["candidates"][0].get("holdout_ratio") is not None  # the best is re-scored held out
    best = report["candidates"][0]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(best["layers"]) == 3
    assert json.loads((out / "nanoq_surgery.json").read_text())["layer_map"]["label"] == best["label"]


def test_search_input_errors(tiny_chat_model, short_text, tmp_path):
    with pytest.raises(NanoqError, match=r"--text .*text.txt: \d+ tokens; 100 search and 1 held-out windows of 64 need 6464"):
        run_search(tiny_chat_model, short_text, SearchSettings(budget=1, **{**TINY, "windows": 100}), tmp_path / "r.json")
    with pytest.raises(NanoqError, match=r"--text .*nothing.txt: file not found"):
        run_search(tiny_chat_model, tmp_path / "nothing.txt", SearchSettings(), tmp_path / "r.json")
    with pytest.raises(NanoqError, match=r"--max-qa-loss 2: a fraction"):
        run_search(tiny_chat_model, short_text, SearchSettings(max_qa_loss=2), tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
