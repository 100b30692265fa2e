"""The config of a surgered model: `num_hidden_layers`, every per-block field rewritten for the new block order
(`surgery.layer_fields` finds them in transformers' own config class), and a check that transformers then builds
every new block as its source block (`surgery.verify`)."""

from __future__ import annotations

import copy

from ..errors import NanoqError
from .layer_fields import INDEX_LISTS, check_index_list, layer_fields, restate_pattern
from .plan import LayerMap
from .verify import check_blocks_follow


def surgered_config(config: dict, layer_map: LayerMap, where: str) -> dict:
    """A copy of `config` (a config.json dict) for the model made by `layer_map`; NanoqError naming `where` when
    the config disagrees with the map or the new order cannot be stated in it.

    - per-layer lists (stated or derived by the config class) are written out, reordered with their blocks;
    - a list of block indices (`mlp_only_layers`) names the new indices of the blocks it named;
    - a pattern field (`max_window_layers`) gets a value that derives the new lists; where none does, the surgery
      is refused if the pattern is what defines the blocks (no list stated), else the stated lists govern;
    - finally both models are built on the meta device and each new block compared with its source block.
    """
    n = config.get("num_hidden_layers")
    if n != layer_map.num_source_layers:
        raise NanoqError(f"{where}: num_hidden_layers is {n!r} but the layer map is for {layer_map.num_source_layers} blocks")
    sources = layer_map.sources
    fields = layer_fields(config, where)
    new = copy.deepcopy(config)
    new["num_hidden_layers"] = layer_map.num_layers
    new_lists = {key: [values[source] for source in sources] for key, values in fields.lists.items()}
    new.update(copy.deepcopy(new_lists))
    for key in INDEX_LISTS:
        if config.get(key) is not None:
            named = set(check_index_list(config, key, where))
            new[key] = [index for index, source in enumerate(sources) if source in named]
    for key in fields.patterns:
        value = restate_pattern(config, key, new_lists, layer_map.num_layers)
        if value is not None:
            new[key] = value
        elif key in fields.stated_patterns:
            shown = "; ".join(f"{name} {values}" for name, values in new_lists.items())
            raise NanoqError(f"{where}: {key}={config[key]} sets blocks by their index, and no value of it gives "
                             f"this surgery's blocks ({shown}); to go on, write {' and '.join(new_lists)} into "
                             "config.json, one entry per block")
    check_blocks_follow(config, new, sources, where)
    return new
