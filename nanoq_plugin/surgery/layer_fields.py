"""Which config fields say something about each decoder block by its index, read off transformers' own config class.

A config can state a per-block property three ways, and surgery must rewrite each for the new block order:

- a **per-layer list**: one entry per block (`layer_types`, SmolLM3's `no_rope_layers`), stated in config.json or
  derived by the config class from `num_hidden_layers` when absent (Gemma 2 alternates sliding and full
  attention without stating it). Found generically: the lists of length `num_hidden_layers` in the config object
  that the class derives again at another length when they are left out (`eos_token_id: [1, 2]` is not one).
- a **pattern**: an integer field from which the class derives a per-layer list by block index (Qwen2's
  `max_window_layers` with sliding windows in use, Gemma 3's `sliding_window_pattern` when `layer_types` is not
  stated). Found generically: the integer fields whose value changes the derived lists.
- a **list of block indices** (`mlp_only_layers`: the blocks of a mixture of experts that are dense). Nothing in
  a config object tells such a list from other integer lists, so these are named here (`INDEX_LISTS`).

A property the modeling code derives from the block index in some other way (Qwen-MoE's `decoder_sparse_step`)
is not found here; `surgery.verify` catches it by building the new model's blocks and comparing each with its
source block.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ..errors import NanoqError

INDEX_LISTS = ("mlp_only_layers",)  # config fields listing block indices (Qwen2-MoE, Qwen3-MoE)
_NOT_PATTERNS = ("num_hidden_layers",)


@dataclass(frozen=True)
class LayerFields:
    """The per-block fields of one config: `lists` (name -> one value per block, as transformers reads them),
    `patterns` (integer fields from which the class derives those lists by block index when they are not stated,
    found only where their current values derive exactly `lists`) and `stated_patterns` (those of `patterns`
    that define the lists in this config as stated: config.json states no list that overrides them)."""

    lists: dict[str, list]
    patterns: tuple[str, ...]
    stated_patterns: tuple[str, ...]


def _config_dict(config: dict) -> dict:
    """`config` without what transformers' config class must not be given again."""
    return {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}


def _build(model_type: str, fields: dict):
    """transformers' config object for `fields`, or None when the class refuses them (a probe, not user input)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception:  # noqa: BLE001  (a probed value the class rejects only means this value derives nothing)
        return None


def derived_lists(model_type: str, fields: dict, names: tuple[str, ...]) -> dict[str, list] | None:
    """The lists `names` as transformers' config class makes them from `fields`; None if it refuses `fields`."""
    built = _build(model_type, fields)
    return None if built is None else {name: built.get(name) for name in names}


def layer_fields(config: dict, where: str) -> LayerFields:
    """The per-block fields of `config` (a config.json dict with a valid `num_hidden_layers`); NanoqError naming
    `where` if transformers' config class refuses it."""
    return _layer_fields(json.dumps(config, sort_keys=True, default=str), where)


@functools.lru_cache(maxsize=32)
def _layer_fields(config_json: str, where: str) -> LayerFields:
    config = json.loads(config_json)
    model_type, n = config.get("model_type"), config["num_hidden_layers"]
    fields = _config_dict(config)
    stated = _build(model_type, fields)
    if stated is None:
        from ..quantizers.anatomy import transformers_config

        transformers_config(config, where)  # raises the one-line refusal naming transformers' reason
        raise NanoqError(f"{where}: transformers refuses this {model_type} config")
    candidates = [k for k, v in stated.items() if isinstance(v, list) and len(v) == n and k not in INDEX_LISTS]
    unstated = {k: v for k, v in fields.items() if k not in candidates}
    lists: dict[str, list] = {}
    for longer in (n + 1, n + 2):  # a class may only accept some layer counts; two tries
        derived = derived_lists(model_type, {**unstated, "num_hidden_layers": longer}, tuple(candidates))
        if derived is not None:
            lists = {k: stated[k] for k in candidates if isinstance(derived[k], list) and len(derived[k]) == longer}
            break
    names = tuple(lists)
    if not names:
        return LayerFields({}, (), ())
    if derived_lists(model_type, unstated, names) != lists:
        return LayerFields(lists, (), ())  # stated lists override what any pattern derives: patterns are dead
    patterns, stated_patterns = [], []
    for key, value in fields.items():
        if key in _NOT_PATTERNS or isinstance(value, bool) or not isinstance(value, int):
            continue
        probes = [v for v in range(n + 2) if v != value]
        if any(_changes(model_type, unstated, key, v, lists, names) for v in probes):
            patterns.append(key)
            if any(_changes(model_type, fields, key, v, lists, names) for v in probes):
                stated_patterns.append(key)
    return LayerFields(lists, tuple(patterns), tuple(stated_patterns))


def _changes(model_type: str, fields: dict, key: str, value: int, baseline, names) -> bool:
    derived = derived_lists(model_type, {**fields, key: value}, names)
    return derived is not None and derived != baseline


def restate_pattern(config: dict, key: str, new_lists: dict[str, list], num_layers: int) -> int | None:
    """A value of pattern `key` from which transformers derives exactly `new_lists` for a model of `num_layers`
    blocks (the current value first), or None when no value does."""
    model_type = config.get("model_type")
    unstated = {k: v for k, v in _config_dict(config).items() if k not in new_lists}
    unstated["num_hidden_layers"] = num_layers
    for value in dict.fromkeys([config[key], *range(num_layers + 2)]):
        if derived_lists(model_type, {**unstated, key: value}, tuple(new_lists)) == new_lists:
            return value
    return None


def check_index_list(config: dict, key: str, where: str) -> list[int]:
    """`config[key]` as a list of block indices; NanoqError naming `where` otherwise."""
    values = config[key]
    n = config["num_hidden_layers"]
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n
                                               for v in values):
        raise NanoqError(f"{where}: {key} should list block indices in 0..{n - 1}, found {values!r}")
    return values
