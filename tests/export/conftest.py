"""Fixtures of the export tests."""

import pytest

from gguf_models import SAMPLE


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, smollm2_dir):
    """A byte-level BPE of 320 tokens (trained here) with SmolLM2's special tokens and chat template: the
    GGUF reader parses a 49152-token vocabulary in ~9 s per load, this one at once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([SAMPLE, "The quick brown fox jumps over the lazy dog. " * 3] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = (smollm2_dir / "chat_template.jinja").read_text()
    directory = tmp_path_factory.mktemp("small-tokenizer")
    fast.save_pretrained(directory)
    return directory
