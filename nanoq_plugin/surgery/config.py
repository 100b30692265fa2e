"""The config of a surgered model: `num_hidden_layers`, the per-layer lists reordered with their blocks, and
Qwen2/Qwen3's `max_window_layers` where sliding-window attention is in use."""

from __future__ import annotations

import copy

from ..errors import NanoqError
from .plan import LayerMap

# Config entries holding one value per decoder block (transformers' `layer_types`; SmolLM3's `no_rope_layers`).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
FULL, SLIDING = "full_attention", "sliding_attention"


def _uses_sliding_window(config: dict) -> bool:
    return bool(config.get("use_sliding_window")) and config.get("sliding_window") is not None


def source_layer_types(config: dict) -> list[str] | None:
    """The attention type of every source block: `layer_types`, else derived as transformers derives it for
    Qwen2/Qwen3 (sliding from `max_window_layers` on when sliding is in use), else None."""
    n = config["num_hidden_layers"]
    if isinstance(config.get("layer_types"), list):
        return list(config["layer_types"])
    if _uses_sliding_window(config) and "max_window_layers" in config:
        return [SLIDING if i >= config["max_window_layers"] else FULL for i in range(n)]
    return None


def surgered_config(config: dict, layer_map: LayerMap, where: str) -> dict:
    """A copy of `config` (a config.json dict) for the model made by `layer_map`; NanoqError naming `where`
    when the config disagrees with the map or the new order cannot be stated in it."""
    n = config.get("num_hidden_layers")
    if n != layer_map.num_source_layers:
        raise NanoqError(f"{where}: num_hidden_layers is {n!r} but the layer map is for {layer_map.num_source_layers} blocks")
    new = copy.deepcopy(config)
    new["num_hidden_layers"] = layer_map.num_layers
    for key in PER_LAYER_KEYS:
        if key not in config or config[key] is None:
            continue
        values = config[key]
        if not isinstance(values, list) or len(values) != n:
            raise NanoqError(f"{where}: {key} should list one entry per block ({n}), found {values!r}")
        new[key] = [values[source] for source in layer_map.sources]
    if _uses_sliding_window(config) and "max_window_layers" in config:
        types = [source_layer_types(config)[source] for source in layer_map.sources]
        first_sliding = types.index(SLIDING) if SLIDING in types else len(types)
        if FULL in types[first_sliding:]:
            raise NanoqError(f"{where}: this surgery puts a full-attention block after a sliding-window one "
                             f"({types}); Qwen2-style max_window_layers cannot state that order")
        new["layer_types"] = types
        new["max_window_layers"] = first_sliding
    return new
