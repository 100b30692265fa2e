"""The drop-one search over all 30 blocks of SmolLM2-135M, on a short WikiText-2 slice (one window of 256
tokens, one held out) and the first 10 questions of the packaged suite: what CI can afford. The full search
is benchmarks/surgery_search.py."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.surgery.qa import DEFAULT_QA_FILE
from nanoq_plugin.surgery.search import run_search
from nanoq_plugin.surgery.settings import SearchSettings

pytestmark = pytest.mark.slow


def test_drop_one_search_over_all_30_blocks(smollm2_dir, wikitext, tmp_path):
    qa = tmp_path / "qa10.jsonl"
    qa.write_text("\n".join(DEFAULT_QA_FILE.read_text().splitlines()[:10]) + "\n")
    settings = SearchSettings(mode="drop1", budget=30, ctx=256, windows=1, holdout_windows=1, confirm=1)
    report = run_search(smollm2_dir, wikitext, settings, tmp_path / "r.json", qa_file=qa, output_dir=tmp_path / "best",
                        progress=False)

    assert sorted(r["label"] for r in report["candidates"]) == sorted(f"drop{i}" for i in range(30))
    assert report["new_evaluations"] == 31 and json.loads((tmp_path / "r.json").read_text())["best"] == report["best"]
    base, ranked = report["baseline"], report["candidates"]
    assert base["qa_total"] == 10 and base["qa_correct"] >= 8  # the capitals the base model knows
    by_label = {r["label"]: r for r in ranked}
    assert by_label["drop0"]["ppl_ratio"] > 10  # the first block is indispensable
    assert ranked[0]["ppl_ratio"] < 1.2  # some middle block costs little perplexity
    keys = [(not r["eligible"], r["ppl_ratio"]) for r in ranked]
    assert keys == sorted(keys)
    assert ranked[0]["holdout_ratio"] is not None

    # the written best model scores, from disk, what its in-memory evaluation scored
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "best", dtype=torch.float32).eval()
    assert best.config.num_hidden_layers == 29
    text = wikitext.read_bytes().decode("utf-8")  # as the search reads it: CRLF kept (read_text() would drop the CRs)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text, return_tensors="pt").input_ids[0][:256]
    ppl = evaluate_perplexity({"best": best}, ids, 256, 256, progress=False).perplexity["best"]
    assert ppl == pytest.approx(ranked[0]["ppl"], rel=1e-5)
