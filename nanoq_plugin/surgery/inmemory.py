"""A layer map applied to a loaded transformers model without copying weights, to evaluate candidates.

Each new block is a shallow view of its source block (same parameter tensors) in which every module that holds
the block's index (`layer_idx`: the attention's KV-cache slot) carries the new index, so the cache of a
duplicated block gets its own slot; the config fields `surgered_config` rewrites (`num_hidden_layers`, the
per-layer lists such as `layer_types`, which the model reads to pick each block's mask and rotary embedding)
take their new values. The original blocks and config are restored on exit. The tests check that this model's
logits equal those of the checkpoint `write_surgery` writes.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from torch import nn

from ..errors import NanoqError
from ..quantizers.anatomy import decoder_blocks
from .config import surgered_config
from .plan import LayerMap

_ABSENT = object()


def _holds_index(module: nn.Module) -> bool:
    return any(hasattr(sub, "layer_idx") for sub in module.modules())


def _block_view(module: nn.Module, layer_idx: int) -> nn.Module:
    """A new module object over `module`'s parameters whose submodules holding `layer_idx` hold the new one (the
    path to each is copied; every other submodule is shared)."""
    view = copy.copy(module)
    view._modules = {name: _block_view(child, layer_idx) if child is not None and _holds_index(child) else child
                     for name, child in module._modules.items()}
    if hasattr(module, "layer_idx"):
        view.layer_idx = layer_idx
    return view


@contextmanager
def surgered(model: nn.Module, layer_map: LayerMap):
    """Within the block, `model` (a transformers causal LM) computes as the surgered model."""
    config = model.config
    if config.num_hidden_layers != layer_map.num_source_layers:
        raise NanoqError(f"the model has {config.num_hidden_layers} blocks, the layer map is for "
                         f"{layer_map.num_source_layers}")
    path, blocks = decoder_blocks(model, layer_map.num_source_layers, "model config")
    parent_name, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    stated = config.to_dict()
    new_values = surgered_config(stated, layer_map, "model config")
    changed = [key for key, value in new_values.items() if stated.get(key, _ABSENT) != value]
    saved = {key: copy.deepcopy(getattr(config, key, _ABSENT)) for key in changed}
    try:
        for key in changed:
            setattr(config, key, copy.deepcopy(new_values[key]))
        setattr(parent, attribute, nn.ModuleList([_block_view(blocks[source], index)
                                                  for index, source in enumerate(layer_map.sources)]))
        yield model
    finally:
        setattr(parent, attribute, blocks)
        for key, value in saved.items():
            if value is _ABSENT:
                delattr(config, key)
            else:
                setattr(config, key, value)
