"""The inputs the fuzz cases break: a tiny float model with a tokenizer, its nano checkpoints, a text."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! 0123456789 café naïve\n") * 12
VOCAB = 320


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE of VOCAB tokens trained on TEXT (GGUF-exportable, loads at once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


def float_model(directory: Path, tokenizer_dir: Path, arch: str = "llama", tied: bool = False) -> Path:
    """2 blocks, hidden 128, 4 heads (2 kv), bfloat16, max 128 positions, the tokenizer of `tokenizer_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    extra = {"head_dim": 32} if arch == "qwen3" else {}
    config = config_cls(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=tied,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def nano_model(source: Path, directory: Path, recipe: str) -> Path:
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    quantize_checkpoint(source, directory, load_recipe(recipe), progress=False)
    return directory
