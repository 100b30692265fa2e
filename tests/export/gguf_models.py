"""Tiny models of the GGUF tests: 2 blocks of a real architecture and a tokenizer the export can carry."""

import shutil

import torch

SAMPLE = "Hello world! 12345 tokens, café — naïve\n\tcode: x = f(y) <|im_start|>user\nHi<|im_end|>"


def tiny_model(arch: str, directory, tokenizer_dir, tied: bool, vocab_size: int = 320):
    """2 blocks, hidden 128 (4 heads), the tokenizer of `tokenizer_dir`; Qwen3 with head_dim 128, the value
    transformers' GGUF reader assumes for Qwen3 (it does not read attention.key_length)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    extra = {"head_dim": 128} if arch == "qwen3" else {}
    config = config_cls(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
                        **extra)
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16)
    for name, param in model.named_parameters():  # norms and biases off their init, so their mapping shows
        if param.dim() == 1:
            param.data.uniform_(0.5, 1.5) if "norm" in name else param.data.normal_(0, 0.1)
        else:
            param.data.normal_(0, 0.05)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory
