"""Which decoder-only architectures nanoq knows: where their blocks are and which linears they hold."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NanoqError
from ..format.checkpoint import SourceCheckpoint
from ..format.expected_tensors import check_float_tensors


@dataclass(frozen=True)
class Architecture:
    """Tensor naming of a decoder-only model family."""

    block_prefix: str
    block_linears: tuple[str, ...]
    fused_groups: tuple[tuple[str, ...], ...]
    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    final_norm: str = "model.norm"

    def block_of(self, tensor_name: str) -> int | None:
        """Index of the decoder block that stores `tensor_name`, or None outside the blocks."""
        prefix = self.block_prefix + "."
        if not tensor_name.startswith(prefix):
            return None
        index = tensor_name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def linears_of_block(self, index: int) -> list[str]:
        """Module names of the linears of block `index`, e.g. `model.layers.3.mlp.down_proj`."""
        return [f"{self.block_prefix}.{index}.{suffix}" for suffix in self.block_linears]


_LLAMA_LIKE = Architecture(
    block_prefix="model.layers",
    block_linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    fused_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
)

SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


def architecture_for(config: dict, where: str) -> Architecture:
    """The architecture of a model config; NanoqError naming `where` for an unsupported model type."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise NanoqError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def open_float_source(source_dir: str | os.PathLike, instead: str) -> tuple[SourceCheckpoint, Architecture]:
    """The float checkpoint at `source_dir` and its architecture; NanoqError naming its config.json when the model
    type is unsupported, the checkpoint is already quantized (`instead` says what to do), or `num_hidden_layers`
    is missing; naming the tensor when the stored tensors are not exactly those the config describes
    (`format.expected_tensors`)."""
    source = SourceCheckpoint(source_dir)
    where = str(source.directory / "config.json")
    arch = architecture_for(source.config, where)
    if "quantization_config" in source.config:
        method = source.config["quantization_config"].get("quant_method")
        raise NanoqError(f"{where}: already quantized (quant_method {method!r}); {instead}")
    layers = source.config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise NanoqError(f"{where}: missing or invalid num_hidden_layers")
    check_float_tensors(source)
    return source, arch
