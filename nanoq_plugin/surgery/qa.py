"""The factual question suite: greedy short answers under the chat template, scored by exact match.

A suite is a JSONL file, one `{"question": str, "answers": [str, ...]}` per line (`qa_facts.jsonl` beside
this module is the default: 30 questions). Every question is asked in the same chat: a system prompt asking
for one word or number and five worked examples (`EXAMPLES`, none of them in the suite), then the
question. The answer is the first line of at most `max_new_tokens` greedy tokens; it is correct when its
normalised form equals the normalised form of one of the accepted answers (lowercase, punctuation to
spaces, the articles a/an/the removed, whitespace collapsed). "The capital is Paris." is therefore wrong
for "Paris": the score counts facts stated as asked, which is what a surgery must not break.

The chat prefix shared by all questions is computed once per model and its KV cache reused by the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NanoqError

DEFAULT_QA_FILE = Path(__file__).with_name("qa_facts.jsonl")
SYSTEM_PROMPT = "Answer with a single word or number. No sentences."
EXAMPLES = (
    ("What is the capital of Portugal?", "Lisbon"),
    ("How many wheels does a bicycle have?", "2"),
    ("What color is grass?", "Green"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("What is the chemical symbol for iron?", "Fe"),
)
ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]


def load_questions(path: str | os.PathLike) -> list[Question]:
    """The questions of a JSONL suite; NanoqError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise NanoqError(f"--qa {path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise NanoqError(f"--qa {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NanoqError(f"{path}:{number}: not valid JSON ({err})") from None
        question = record.get("question") if isinstance(record, dict) else None
        answers = record.get("answers") if isinstance(record, dict) else None
        if (not isinstance(question, str) or not question.strip() or not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and normalize(a) for a in answers)):
            raise NanoqError(f"{path}:{number}: expected {{\"question\": str, \"answers\": [non-empty str, ...]}}")
        questions.append(Question(question.strip(), tuple(answers)))
    if not questions:
        raise NanoqError(f"{path}: no questions")
    return questions


def suite_fingerprint(questions: list[Question]) -> str:
    """A hash of the questions, accepted answers and prompt: equal fingerprints score the same way."""
    payload = json.dumps([SYSTEM_PROMPT, EXAMPLES, [(q.question, q.answers) for q in questions]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def normalize(text: str) -> str:
    """First line, lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    text = text.strip().split("\n", 1)[0].lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, question: Question) -> bool:
    """Whether the normalised prediction equals one of the normalised accepted answers."""
    return normalize(prediction) in {normalize(answer) for answer in question.answers}


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-template text of `question` after the system prompt and the worked examples."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for asked, answered in EXAMPLES:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences) - 1  # every question keeps at least one token of its own
    for position in range(length):
        if any(s[position] != sequences[0][position] for s in sequences):
            return position
    return length


@torch.inference_mode()
def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (decoded text of the new tokens, special tokens skipped), one per question.

    The prompts' common token prefix goes through the model once; its KV cache is repeated over the batch,
    and each question's remaining tokens are left-padded behind it (masked, positions continuing the prefix).
    """
    from transformers import DynamicCache

    if tokenizer.chat_template is None:
        raise NanoqError("the question suite needs a tokenizer with a chat template")
    encoded = [tokenizer(chat_prompt(tokenizer, q.question), add_special_tokens=False).input_ids for q in questions]
    shared = _common_prefix_length(encoded)
    device = model.device
    cache = DynamicCache(config=model.config)
    if shared:
        model(torch.tensor([encoded[0][:shared]], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(questions))
    tails = [ids[shared:] for ids in encoded]
    width = max(len(t) for t in tails)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(questions), shared + width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, tail in enumerate(tails):
        input_ids[row, :shared] = torch.tensor(encoded[row][:shared])
        input_ids[row, shared + width - len(tail):] = torch.tensor(tail)
        attention[row, :shared] = 1
        attention[row, shared + width - len(tail):] = 1
    out = model.generate(input_ids.to(device), attention_mask=attention.to(device), past_key_values=cache,
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[shared + width:], skip_special_tokens=True) for row in out.cpu()]


def score_answers(questions: list[Question], answers: list[str]) -> dict:
    """`{"correct": int, "total": int, "accuracy": float, "items": [{"question", "answer", "correct"}]}`."""
    items = [{"question": q.question, "answer": a.strip(), "correct": is_correct(a, q)} for q, a in zip(questions, answers)]
    correct = sum(item["correct"] for item in items)
    return {"correct": correct, "total": len(items), "accuracy": correct / len(items), "items": items}
