"""The question suite: normalisation, file checks, and batched answers with a shared prefix cache."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.surgery.qa import (DEFAULT_QA_FILE, Question, answer_questions, chat_prompt, is_correct,
                                     load_questions, normalize, score_answers)


def test_packaged_suite_has_at_least_20_distinct_questions():
    questions = load_questions(DEFAULT_QA_FILE)
    assert len(questions) >= 20
    assert len({q.question for q in questions}) == len(questions)
    assert all(len(answer.split()) <= 3 for q in questions for answer in q.answers)  # short answers


@pytest.mark.parametrize("prediction, answers, correct", [
    ("Paris", ["Paris"], True),
    (" paris.\nThe capital", ["Paris"], True),       # first line only, punctuation dropped
    ("The heart", ["Heart"], True),                   # articles dropped
    ("Leonardo da Vinci!", ["Leonardo da Vinci"], True),
    ("The capital of France is Paris.", ["Paris"], False),  # exact match, not containment
    ("12 months in a year", ["12", "Twelve"], False),
    ("Twelve", ["12", "Twelve"], True),
    ("Ag(I)", ["Ag"], False),
    ("", ["Paris"], False),
])
def test_exact_match_after_normalisation(prediction, answers, correct):
    assert is_correct(prediction, Question("q", tuple(answers))) is correct


def test_normalize():
    assert normalize("  The   Great, Wall!  ") == "great wall"
    assert normalize("H2O") == "h2o"


@pytest.mark.parametrize("line, message", [
    ("not json", r":1: not valid JSON"),
    ("[1, 2]", r":1: expected \{\"question\": str"),
    (json.dumps({"question": "Q?"}), r":1: expected \{\"question\": str, \"answers\""),
    (json.dumps({"question": "Q?", "answers": []}), r":1: expected"),
    (json.dumps({"question": "Q?", "answers": ["..."]}), r":1: expected"),  # normalises to nothing
])
def test_malformed_suite_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(NanoqError, match=str(path).replace(".", r"\.") + message):
        load_questions(path)
    with pytest.raises(NanoqError, match=r"--qa .*missing.jsonl: file not found"):
        load_questions(tmp_path / "missing.jsonl")


def test_batched_answers_with_shared_prefix_equal_one_by_one_generation(tiny_chat_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    for parameter in model.parameters():  # larger weights: greedy choices that are not near-ties
        parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    questions = [Question(q, ("x",)) for q in ("Why?", "What is the capital of a very long country name here?",
                                               "How many?")]
    answers = answer_questions(model, tokenizer, questions, max_new_tokens=6)
    for question, answer in zip(questions, answers):
        ids = tokenizer(chat_prompt(tokenizer, question.question), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(set(answers)) > 1  # the questions were really told apart
    scored = score_answers(questions, ["x", "y", "The x"])
    assert (scored["correct"], scored["total"]) == (2, 3) and [i["correct"] for i in scored["items"]] == [True, False, True]
