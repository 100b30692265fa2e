"""`nanoq surgery SRC OUT --drop/--swap/--duplicate`: write the surgered model as a plain Hugging Face folder.

Tensors are streamed one at a time from the source safetensors into shards in a temp dir beside OUT, with
`model.layers.{source}.` renamed to `model.layers.{new}.`; the folder is renamed into place only when
complete. A duplicated block is stored twice (engines load one tensor per block). The config gets the new
`num_hidden_layers` and per-block fields (`surgery.config`); tokenizer and generation files are copied;
`nanoq_surgery.json` records the source and the layer map.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import NanoqError
from ..format.checkpoint import SIDE_FILES, CheckpointWriter, SourceCheckpoint
from ..quantizers.architectures import architecture_for, open_float_source as open_checked
from .config import surgered_config
from .plan import LayerMap

PROVENANCE_NAME = "nanoq_surgery.json"


def open_float_source(source_dir: str | os.PathLike) -> SourceCheckpoint:
    """The source checkpoint of a surgery, checked to be a float model of a supported architecture with a
    valid `num_hidden_layers`; NanoqError naming its config.json otherwise."""
    return open_checked(source_dir, instead="operate on the float model, then quantize the result")[0]


def output_tensor_names(source: SourceCheckpoint, layer_map: LayerMap) -> list[tuple[str, str]]:
    """`[(output name, source name)]` in write order: tensors outside the blocks first, then the new blocks
    0..n-1, each with its source block's tensors renamed. NanoqError if a source block has no tensors or a
    tensor names a block the config does not have."""
    arch = architecture_for(source.config, str(source.directory / "config.json"))
    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in source.keys():
        block = arch.block_of(name)
        if block is None:
            outside.append(name)
        elif block >= layer_map.num_source_layers:
            raise NanoqError(f"{source.file_of(name)}: tensor '{name}' belongs to block {block}, but config.json "
                             f"has num_hidden_layers {layer_map.num_source_layers}")
        else:
            by_block.setdefault(block, []).append(name)
    missing = sorted(set(layer_map.sources) - set(by_block))
    if missing:
        raise NanoqError(f"{source.directory}: no tensors for block {missing[0]} ('{arch.block_prefix}.{missing[0]}.*')")
    pairs = [(name, name) for name in outside]
    for new_index, source_index in enumerate(layer_map.sources):
        old_prefix = f"{arch.block_prefix}.{source_index}."
        new_prefix = f"{arch.block_prefix}.{new_index}."
        pairs += [(new_prefix + name[len(old_prefix):], name) for name in by_block[source_index]]
    return pairs


def write_surgery(source_dir: str | os.PathLike, output_dir: str | os.PathLike, layer_map: LayerMap,
                  progress: bool = True, max_shard_bytes: int = 512 * 2**20) -> Path:
    """Write the model of `layer_map` applied to `source_dir` into `output_dir` (absent or empty); returns it.

    Memory holds one output shard at most (`max_shard_bytes`), whatever the model size.
    """
    source = open_float_source(source_dir)
    config = surgered_config(source.config, layer_map, str(source.directory / "config.json"))
    pairs = output_tensor_names(source, layer_map)
    provenance = {"source": str(source.directory.resolve()), "layer_map": layer_map.to_dict(), "nanoq": __version__}
    with CheckpointWriter(output_dir, max_shard_bytes=max_shard_bytes) as writer:
        for new_name, source_name in tqdm(pairs, desc="surgery", unit="tensor", disable=not progress):
            writer.add(new_name, source.get(source_name))
        side_files = [source.directory / name for name in SIDE_FILES if (source.directory / name).is_file()]
        return writer.commit({"config.json": config, PROVENANCE_NAME: provenance}, side_files)
