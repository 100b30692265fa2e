"""Where a decoder-only model keeps its blocks and linears: read from its own transformers class
(quantizers.anatomy), so any architecture transformers builds is handled the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import NanoqError
from ..format.checkpoint import SourceCheckpoint
from ..format.expected_tensors import check_float_tensors, model_tensors
from .experts import MoeAnatomy, SavedExpertsSource
from .anatomy import InputGroup, discover

# The families the test suite quantizes, loads and serves (tests/quantizers/test_architectures.py); any other
# decoder transformers builds goes through the same discovery.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")


@dataclass(frozen=True)
class Architecture:
    """Tensor naming of a decoder-only model: its blocks, their linears grouped by shared input (in the order a
    block uses them, with the producer a scale folds into), the embedding, the head and the final norm."""

    block_prefix: str
    groups: tuple[InputGroup, ...]
    embedding: str = "model.embed_tokens"
    lm_head: str | None = "lm_head"
    final_norm: str | None = "model.norm"
    experts: MoeAnatomy | None = None  # a mixture-of-experts model's experts (quantizers.experts)

    def saved(self, relative: str) -> str:
        """The saved name of a block module or tensor (relative to the block) given its in-memory name; the same name
        except where transformers renames it on save (Mixtral's `mlp.` -> `block_sparse_moe.`)."""
        if self.experts is None:
            return relative
        if relative.endswith((".weight", ".bias")):  # a tensor
            return self.experts.saved(relative)
        return self.experts.saved(relative + ".weight").removesuffix(".weight")

    def expert_modules(self, index: int) -> dict[str, list[str]]:
        """Role (`gate_up_proj`, `down_proj`) -> the saved module names of block `index`'s expert projections
        of that role, expert by expert (`...experts.0.gate_proj`, `...experts.0.up_proj`, ...)."""
        return {} if self.experts is None else self.experts.role_modules(index)

    def gate_modules(self, index: int) -> list[str]:
        """Saved names of block `index`'s routing gates (the router and e.g. a shared-expert gate)."""
        gates = () if self.experts is None else self.experts.gates
        return [f"{self.block_prefix}.{index}.{self.saved(gate)}" for gate in gates]

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group.linears)

    @property
    def fused_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that read one input (engines may fuse them): the planner gives each group one scheme."""
        return tuple(group.linears for group in self.groups if len(group.linears) > 1)

    def group_of(self, linears: tuple[str, ...]) -> InputGroup:
        return next(group for group in self.groups if group.linears == tuple(linears))

    def block_of(self, tensor_name: str) -> int | None:
        """Index of the decoder block that stores `tensor_name`, or None outside the blocks."""
        prefix = self.block_prefix + "."
        if not tensor_name.startswith(prefix):
            return None
        index = tensor_name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def linears_of_block(self, index: int) -> list[str]:
        """Saved module names of the quantizable linears of block `index`, e.g. `model.layers.3.mlp.down_proj`,
        then its experts' projections (`model.layers.3.mlp.experts.7.gate_proj`); routing gates are not
        among them (`gate_modules`)."""
        gates = set(self.experts.gates if self.experts is not None else ())
        dense = [f"{self.block_prefix}.{index}.{self.saved(suffix)}" for suffix in self.block_linears
                 if suffix not in gates]
        return dense + [m for modules in self.expert_modules(index).values() for m in modules]


def architecture_for(config: dict, where: str) -> Architecture:
    """The architecture of a model config, discovered from its transformers class; NanoqError naming `where` and
    what could not be found."""
    if not isinstance(config.get("model_type"), str):
        raise NanoqError(f"{where}: no model_type")
    anatomy = discover(config, where)
    if anatomy.final_norm is None:
        raise NanoqError(f"{where}: no final norm found after the decoder blocks of model_type "
                         f"{anatomy.model_type!r}: its anatomy cannot be discovered")
    return Architecture(anatomy.block_prefix, anatomy.groups, anatomy.embedding, anatomy.lm_head, anatomy.final_norm,
                        anatomy.experts)


def open_float_source(source_dir: str | os.PathLike, instead: str) -> tuple[SourceCheckpoint, Architecture]:
    """The float checkpoint at `source_dir` and its architecture; NanoqError naming its config.json when the model
    type is unsupported, the checkpoint is already quantized (`instead` says what to do), or `num_hidden_layers`
    is missing; naming the tensor when the stored tensors are not exactly those the config describes
    (`format.expected_tensors`)."""
    source = SourceCheckpoint(source_dir)
    where = str(source.directory / "config.json")
    if isinstance(source.config.get("model_type"), str):
        model_tensors(source.config, where)  # a config transformers cannot build: one line, before discovery
    arch = architecture_for(source.config, where)
    if "quantization_config" in source.config:
        method = source.config["quantization_config"].get("quant_method")
        raise NanoqError(f"{where}: already quantized (quant_method {method!r}); {instead}")
    layers = source.config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise NanoqError(f"{where}: missing or invalid num_hidden_layers")
    check_float_tensors(source)  # either layout of a mixture of experts: all saved names, or all in-memory ones
    if arch.experts is None:
        return source, arch
    # a mixture of experts is quantized under its saved names (one weight per expert projection)
    return SavedExpertsSource(source, arch.experts, arch.block_prefix), arch
