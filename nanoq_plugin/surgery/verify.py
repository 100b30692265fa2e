"""The check that a surgered config builds each new block as its source block: both models are built on the meta
device (no weights) with transformers' own classes, and block `i` of the new model is compared with block
`sources[i]` of the source model — module classes, parameter and buffer shapes, and every plain attribute (an
attention's `sliding_window`, a block's `attention_type`, a dense MLP where the source had experts), all but the
block's own index. A config field that sets blocks by their index in a way `surgery.layer_fields` did not rewrite
(Qwen-MoE's `decoder_sparse_step`) shows up here as a difference, and the surgery is refused.
"""

from __future__ import annotations

import functools
import json

from ..errors import NanoqError

# attributes that hold the block's own position (the KV-cache slot): they differ by design
INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_number"})
_PLAIN = (int, float, str, bool, type(None))


def block_signature(block) -> dict[str, object]:
    """`{path: value}` describing how `block` (an nn.Module) was built: `path:class` per submodule, the shape of
    every parameter and buffer, and every public attribute holding a plain value or a tuple/list of them."""
    signature: dict[str, object] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        signature[f"{prefix}class"] = type(module).__name__
        for key, value in vars(module).items():
            if key.startswith("_") or key in INDEX_ATTRIBUTES:
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, (tuple, list))
                                             and all(isinstance(v, _PLAIN) for v in value)):
                signature[prefix + key] = value
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            signature[prefix + key] = tuple(tensor.shape)
    return signature


def block_signatures(config: dict, where: str) -> list[dict[str, object]]:
    """The signature of every decoder block of the model `config` (a config.json dict) describes."""
    return _block_signatures(json.dumps(config, sort_keys=True, default=str), where)


@functools.lru_cache(maxsize=8)
def _block_signatures(config_json: str, where: str) -> list[dict[str, object]]:
    from ..quantizers.anatomy import decoder_blocks, meta_model, transformers_config

    config = json.loads(config_json)
    model = meta_model(transformers_config(config, where), where)
    _, blocks = decoder_blocks(model, config["num_hidden_layers"], where)
    return [block_signature(block) for block in blocks]


def check_blocks_follow(source_config: dict, new_config: dict, sources: tuple[int, ...], where: str) -> None:
    """NanoqError naming `where` when block `i` of the model `new_config` describes is not built like block
    `sources[i]` of the model `source_config` describes (the shallowest difference is named)."""
    before = block_signatures(source_config, where)
    after = block_signatures(new_config, where)
    for index, source in enumerate(sources):
        old, new = before[source], after[index]
        if old == new:
            continue
        # the shallowest difference names the cause (`mlp.class`), not a consequence (`mlp.act_fn.class`)
        key = min((k for k in old.keys() | new.keys() if old.get(k, "absent") != new.get(k, "absent")),
                  key=lambda k: (k.count("."), k))
        raise NanoqError(f"{where}: new block {index} (source block {source}) would be built with {key} = "
                         f"{new.get(key, 'absent')!r} instead of {old.get(key, 'absent')!r}: a config field sets "
                         "blocks by their index in a way surgery cannot rewrite")
