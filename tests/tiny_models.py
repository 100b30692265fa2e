"""Tiny random models of real architectures, built from transformers' own config classes (imported by tests
and by conftest's fixtures)."""

from __future__ import annotations

from pathlib import Path

import torch

# Per family, what makes a tiny model exercise its differences: explicit head_dim (Gemma, Qwen3), sliding and
# full attention layers, soft-capping (Gemma 2), Granite's multipliers.
FAMILY_SETTINGS = {
    "mistral": {"sliding_window": 16},
    "qwen3": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 32},
    "gemma3_text": {"head_dim": 32, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 32},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                "attention_multiplier": 0.1},
    # mixtures of experts: 8 experts, 2 per token, every block sparse
    "qwen3_moe": {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64},
    # with a shared expert and its gate
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": []},
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def family_settings(arch: str, num_layers: int) -> dict:
    """FAMILY_SETTINGS of `arch` for a model of `num_layers` blocks: its per-layer list repeated to that length."""
    settings = dict(FAMILY_SETTINGS.get(arch, {}))
    if "layer_types" in settings:
        settings["layer_types"] = (settings["layer_types"] * num_layers)[:num_layers]
    return settings


def build_tiny_model(arch: str, directory: Path, num_layers: int = 2, dtype=torch.bfloat16, seed: int = 0,
                     tie_word_embeddings: bool = False, vocab_size: int = 320, perturb_norms: bool = True,
                     fused_experts: bool = False) -> Path:
    """Save a tiny random-weight model of `arch` (any model_type transformers builds; hidden 96 so that group
    size 128 must fall back to 32), from transformers' own config class. A mixture of experts is saved as
    `save_pretrained` writes it (one weight per expert projection), or with `fused_experts` as transformers holds
    it in memory (`mlp.experts.gate_up_proj [E, 2I, H]`, every tensor under its in-memory name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = family_settings(arch, num_layers)
    settings.setdefault("intermediate_size", 256)
    config = AutoConfig.for_model(
        arch, hidden_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them differ so folds are seen
        for name, param in model.named_parameters() if perturb_norms else ():
            if param.dim() == 1 and "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    if fused_experts:
        from safetensors.torch import save_file

        for file in Path(directory).glob("model*.safetensors*"):
            file.unlink()
        save_file({name: t.contiguous() for name, t in model.state_dict().items()},
                  str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
    return directory
