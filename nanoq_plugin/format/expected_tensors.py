"""The tensors a model needs, derived from its config.json, checked against what a folder stores.

The model's own transformers class, built on the meta device from the config (no memory, no weights), names
every parameter and persistent buffer with its shape; a head tied to the embedding may be stored or not. A nano
checkpoint stores each quantized module's tensors (`layout.param_specs` of its scheme on the weight's
`[out, in]`) instead of its `weight`, and nothing for a head tied to a quantized table.

Mixture-of-experts models: transformers holds each block's experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`)
but saves them per expert (`mlp.experts.{e}.gate_proj.weight`, through the family's conversion mapping); the
stored names are what `save_pretrained` writes (`format.expert_tensors`). A float source may store either layout
(all in-memory names, or all saved names); a nano checkpoint stores every expert projection per expert, each a
linear of its scheme, with one scheme per expert role per block (an engine's fused-MoE layer holds one tensor
per role for all experts).

A float source is checked before any work (quantize, surgery, export gguf, eval's base) and a nano checkpoint
wherever it is opened (`validate.load_nano_checkpoint`: inspect, eval, the transformers loader, exports): a
missing, unexpected or wrongly shaped tensor, and a non-float weight, are named on one line. So transformers
never initialises a missing weight at random, and a config that disagrees with the tensors is refused before
anything loads.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import torch

from ..errors import NanoqError
from .checkpoint import SourceCheckpoint
from .expert_tensors import ExpertsModule, find_experts_modules
from .layout import param_specs
from .quant_config import NanoQuantConfig

# config.json values quoted when a tensor disagrees with the config
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "tie_word_embeddings")


@dataclass(frozen=True)
class ModelTensors:
    """What the model of a config.json stores: name -> shape as `save_pretrained` writes it (`shapes`) and as
    the model holds it in memory (`memory_shapes`; they differ for fused experts), the names that may be left
    out (tied copies), patterns of names transformers ignores, its input and output embedding modules, and its
    experts modules (empty for a dense model)."""

    model_class: str
    shapes: dict[str, tuple[int, ...]]
    memory_shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str]
    ignored: tuple[str, ...]
    embedding: str | None
    output: str | None
    sizes: str
    experts: tuple[ExpertsModule, ...] = ()

    def is_ignored(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.ignored)


def model_tensors(config: dict, where: str) -> ModelTensors:
    """The tensors of the model that `config` (a config.json's content, read from `where`) describes."""
    key = json.dumps({k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True, default=str)
    return _model_tensors(key, where)


@functools.lru_cache(maxsize=16)
def _model_tensors(config_json: str, where: str) -> ModelTensors:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    config = json.loads(config_json)
    model_type = config.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # any failure to build the model from this user file is a bad config
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise NanoqError(f"{where}: transformers cannot build a {model_type!r} model from it ({reason})") from None
    state = model.state_dict()
    memory_shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    experts = tuple(find_experts_modules(model))
    # the saved names: transformers' own save conversion (meta tensors: shapes only)
    shapes = {name: tuple(tensor.shape) for name, tensor in revert_weight_conversion(model, state).items()}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = {id(module): name for name, module in model.named_modules()}
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    sizes = ", ".join(f"{k} {config[k]}" for k in _SIZE_KEYS if k in config)
    return ModelTensors(
        model_class=type(model).__name__, shapes=shapes, memory_shapes=memory_shapes, optional=frozenset(tied),
        ignored=tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
        embedding=names.get(id(embedding)) if embedding is not None else None,
        output=names.get(id(output)) if output is not None else None, sizes=sizes, experts=experts)


def _compare(tensors: SourceCheckpoint, needed: dict[str, tuple[int, ...]], model: ModelTensors,
             optional: set[str] | frozenset[str]) -> None:
    """NanoqError at the first tensor of `needed` missing from `tensors`, stored but not needed, or of another shape."""
    missing = [name for name in needed if name not in tensors and name not in optional]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NanoqError(f"{tensors.directory}: tensor '{missing[0]}' is missing from the safetensors files{more}; "
                         f"the {model.model_class} of config.json needs it")
    for name in tensors.keys():
        if name not in needed:
            if model.is_ignored(name):
                continue
            raise NanoqError(f"{tensors.file_of(name)}: tensor '{name}' is not part of the {model.model_class} "
                             f"that config.json describes ({model.sizes})")
        found = tuple(tensors.shape(name))
        if found != needed[name]:
            raise NanoqError(f"{tensors.file_of(name)}: tensor '{name}' has shape {list(found)}, config.json "
                             f"implies {list(needed[name])} ({model.sizes})")


def _check_float_dtype(tensors: SourceCheckpoint, name: str) -> None:
    if not tensors.dtype(name).is_floating_point:
        raise NanoqError(f"{tensors.file_of(name)}: tensor '{name}' has dtype "
                         f"{str(tensors.dtype(name)).removeprefix('torch.')}; a float weight is expected")


def check_float_tensors(source: SourceCheckpoint) -> ModelTensors:
    """Refuse a float source whose tensors are not exactly those its config.json describes (names, shapes,
    float dtypes) in one layout, saved or in-memory (they differ for fused experts); returns what it describes."""
    model = model_tensors(source.config, str(source.directory / "config.json"))
    in_memory = [name for name in model.memory_shapes if name not in model.shapes and name in source]
    _compare(source, model.memory_shapes if in_memory else model.shapes, model, model.optional)
    for name in source.keys():
        _check_float_dtype(source, name)
    return model


def check_nano_tensors(tensors: SourceCheckpoint, quant_config: NanoQuantConfig, module_shapes: dict,
                       manifest_path) -> ModelTensors:
    """Refuse a nano checkpoint whose tensors are not exactly those of its config.json's model with the
    quantized modules of `quant_config` stored in their schemes; `module_shapes` (module -> `[out, in]`, from
    the manifest at `manifest_path`) must be the model's weight shapes."""
    where = str(tensors.directory / "config.json")
    model = model_tensors(tensors.config, where)
    tied = quant_config.tied_lm_head
    if tied is not None and tied != model.embedding:
        raise NanoqError(f"{where}: quantization_config ties the LM head to '{tied}', which is not the "
                         f"{model.model_class}'s input embedding ('{model.embedding}')")
    needed: dict[str, tuple[int, ...]] = {}
    quantized_parts: set[str] = set()
    for name, shape in model.shapes.items():
        module = name.removesuffix(".weight")
        scheme = quant_config.modules.get(module) if name.endswith(".weight") else None
        if tied is not None and model.output is not None and name == f"{model.output}.weight":
            continue  # the head computes with the quantized table
        if scheme is None:
            needed[name] = shape
            continue
        if len(shape) != 2:
            raise NanoqError(f"{where}: quantization_config quantizes '{module}', whose weight has shape "
                             f"{list(shape)} (a linear or embedding weight [out, in] is expected)")
        listed = [int(d) for d in module_shapes[module]]
        if listed != list(shape):
            raise NanoqError(f"{manifest_path}: module '{module}' has shape {listed}, config.json implies "
                             f"{list(shape)} ({model.sizes})")
        for part, spec in param_specs(scheme, *shape).items():
            needed[f"{module}.{part}"] = spec.shape
            quantized_parts.add(f"{module}.{part}")
    for module in quant_config.modules:
        if f"{module}.weight" not in model.shapes:
            raise NanoqError(f"{where}: quantization_config quantizes '{module}', which is not a module with a weight "
                             f"in the {model.model_class} that config.json describes")
    check_expert_schemes(model, quant_config, where)
    _compare(tensors, needed, model, model.optional if tied is None else set())
    for name in tensors.keys():
        if name not in quantized_parts:
            _check_float_dtype(tensors, name)
    return model


def check_expert_schemes(model: ModelTensors, quant_config: NanoQuantConfig, where: str) -> None:
    """NanoqError naming the MoE block where one expert role (all experts' gate and up projections, or all their
    down projections) is stored in more than one scheme, float counting as one."""
    for experts in model.experts:
        for role in experts.roles:
            modules = role.modules()
            schemes = {}
            for module in modules:
                scheme = quant_config.modules.get(module)
                schemes.setdefault(scheme.name if scheme is not None else "float", module)
            if len(schemes) > 1:
                found = ", ".join(f"{name} (e.g. '{module}')" for name, module in sorted(schemes.items()))
                raise NanoqError(f"{where}: MoE block '{experts.block}' stores its experts' {role.param} in "
                                 f"{len(schemes)} schemes: {found}; all {len(modules)} of them must share one")
