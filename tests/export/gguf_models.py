"""Tiny models of the GGUF tests: 2 blocks of a real architecture and a tokenizer the export can carry."""

import shutil

import torch

SAMPLE = "Hello world! 12345 tokens, café — naïve\n\tcode: x = f(y) <|im_start|>user\nHi<|im_end|>"

# model_type -> what a tiny model of it sets beyond the shared shape. Values transformers' GGUF reader takes
# from its config defaults instead of the file are left at those defaults (or the reload could not match):
# Qwen3's head_dim 128 (it ignores attention.key_length), Gemma's query_pre_attn_scalar 256 = head_dim (llama.cpp
# scales by 1/sqrt(head_dim)) and Gemma 2's soft-capping 50 / 30. Gemma's sliding_window 8 is shorter than
# the tests' 24 tokens and their rotary bases are not their config defaults, so the file's
# attention.sliding_window and rope.freq_base are what make the reload agree.
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": None, "head_dim": 32},
    "qwen2": {},
    "qwen3": {"head_dim": 128},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8,
               "rope_parameters": {"rope_type": "default", "rope_theta": 20_000.0}},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8, "num_hidden_layers": 6,
                    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}},
    "phi3": {},
    "olmo2": {},
    # off transformers' 1.0 defaults, so that each multiplier's key and value show
    "granite": {"embedding_multiplier": 12.0, "attention_multiplier": 0.1, "residual_multiplier": 0.22,
                "logits_scaling": 8.0},
}


def tiny_model(arch: str, directory, tokenizer_dir, tied: bool, vocab_size: int = 320, **overrides):
    """2 blocks (Gemma 3: 6, so that one is global), hidden 128 (4 heads, 2 KV heads) of Hugging Face
    model_type `arch` (with `EXTRA[arch]` and `overrides`), the tokenizer of `tokenizer_dir`; norms and biases
    off their init so their mapping shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=tied,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
    config = AutoConfig.for_model(arch, **{**shape, **EXTRA[arch], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    norm_low = -0.5 if arch.startswith("gemma") else 0.5  # Gemma's norms scale by 1 + w: both [0.5, 1.5]
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.uniform_(norm_low, norm_low + 1) if "norm" in name else param.data.normal_(0, 0.1)
        else:
            param.data.normal_(0, 0.05)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory
