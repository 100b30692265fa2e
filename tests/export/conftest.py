"""Fixtures of the export tests."""

import json

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


def train_sentencepiece(directory, chat_template: str, add_dummy_prefix: bool, tokenizer_class: str, pad_id: int = -1,
                        extra_symbols: tuple[str, ...] = ()):
    """A SentencePiece BPE of 400 pieces with byte fallback (trained here) in `directory`, as Llama 2, Mistral
    v0.x, Gemma and Phi-3 folders ship theirs: `tokenizer.model` and the `tokenizer.json` transformers makes
    from it; `<|im_start|>` / `<|im_end|>` as user-defined pieces."""
    import io

    import sentencepiece
    from transformers import AutoTokenizer

    model = io.BytesIO()
    lines = [SAMPLE, "The quick brown fox jumps over the lazy dog.", "Über café naïve, 12345: x = f(y)"] * 30
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=pad_id, hard_vocab_limit=False, minloglevel=2,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=["<|im_start|>", "<|im_end|>", *extra_symbols])
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory, smollm2_dir):
    """Llama's kind: a word marker in front of the text."""
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"), (smollm2_dir / "chat_template.jinja").read_text(),
                               add_dummy_prefix=True, tokenizer_class="LlamaTokenizer")


@pytest.fixture(scope="module")
def gemma_sentencepiece_tokenizer(tmp_path_factory, smollm2_dir):
    """Gemma's kind: no word marker in front of the text, and `<pad>` / `<mask>` pieces (transformers' Gemma
    tokenizer adds them past the vocabulary otherwise)."""
    return train_sentencepiece(tmp_path_factory.mktemp("gemma-sentencepiece"),
                               (smollm2_dir / "chat_template.jinja").read_text(), add_dummy_prefix=False,
                               tokenizer_class="GemmaTokenizer", pad_id=3, extra_symbols=("<mask>",))
