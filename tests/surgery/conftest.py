"""Fixtures of the surgery tests: a tiny model that has SmolLM2's tokenizer and chat template, and a text."""

import shutil

import pytest
import torch


@pytest.fixture
def tiny_chat_model(tmp_path, make_tiny_model, smollm2_dir):
    """A 4-block random Llama with SmolLM2's vocabulary, tokenizer and chat template (float32)."""
    source = make_tiny_model("llama", tmp_path / "tiny-chat", num_layers=4, dtype=torch.float32, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, source / name)
    return source


@pytest.fixture
def short_text(tmp_path):
    """About 3000 tokens of plain English (enough for a few windows of 128)."""
    sentences = [f"The {animal} walked {number} miles to the {place} before the sun went down."
                 for number, (animal, place) in enumerate(
                     [("fox", "river"), ("bear", "forest"), ("horse", "village"), ("goat", "mountain")] * 40)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(sentences) + "\n")
    return path
