"""Fixtures of the calibrated-quantizer tests."""

import shutil

import pytest
import torch


@pytest.fixture
def tiny_llama_with_tokenizer(tmp_path, make_tiny_model, smollm2_dir):
    source = make_tiny_model("llama", tmp_path / "src", dtype=torch.float32, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, source / name)
    return source
