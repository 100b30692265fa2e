"""A layer map applied to a loaded transformers model without copying weights, to evaluate candidates.

Each new block is a shallow view of its source block (same parameter tensors) whose attention module carries
the new `layer_idx`, so the KV cache of a duplicated block gets its own slot; the config's
`num_hidden_layers` and per-layer lists follow the map. The original blocks and config are restored on exit.
The tests check that this model's logits equal those of the checkpoint `write_surgery` writes.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

from ..errors import NanoqError
from .config import surgered_config
from .plan import LayerMap

_RESTORED_KEYS = ("num_hidden_layers", "layer_types", "no_rope_layers", "max_window_layers")
_READ_KEYS = ("use_sliding_window", "sliding_window")


def _block_view(block: nn.Module, layer_idx: int) -> nn.Module:
    """A new module object over `block`'s parameters whose `self_attn.layer_idx` is `layer_idx`."""
    view = copy.copy(block)
    view._modules = dict(block._modules)
    attention = copy.copy(block._modules["self_attn"])
    attention.layer_idx = layer_idx
    view._modules["self_attn"] = attention
    return view


@contextmanager
def surgered(model: nn.Module, layer_map: LayerMap):
    """Within the block, `model` (a `*ForCausalLM` with `model.model.layers`) computes as the surgered model."""
    decoder = model.model
    blocks = decoder.layers
    if len(blocks) != layer_map.num_source_layers:
        raise NanoqError(f"the model has {len(blocks)} blocks, the layer map is for {layer_map.num_source_layers}")
    config = model.config
    saved = {key: copy.deepcopy(getattr(config, key)) for key in _RESTORED_KEYS if hasattr(config, key)}
    stated = dict(saved, **{key: getattr(config, key) for key in _READ_KEYS if hasattr(config, key)})
    new_values = surgered_config(stated, layer_map, "model config")
    try:
        for key in saved:
            setattr(config, key, new_values[key])
        decoder.layers = nn.ModuleList([_block_view(blocks[source], index)
                                        for index, source in enumerate(layer_map.sources)])
        yield model
    finally:
        decoder.layers = blocks
        for key, value in saved.items():
            setattr(config, key, value)
