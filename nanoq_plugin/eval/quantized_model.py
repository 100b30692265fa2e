"""The model `nanoq eval` scores for a nano checkpoint.

`dequantized` (the default): every weight-only quantized module is a float module whose weight is
dequantized once by the reference (`format.reference.dequantize`, the spec). Its forward is what the reference
kernel computes on every call — the same numbers (bit for bit in float32 for integer and nvfp4 schemes;
codebook schemes multiply the unrotated weight instead of rotating the input, equal up to float rounding) — at
the float model's speed. A checkpoint whose modules are all weight-only is built as the plain float model of its
config (no kernel is chosen or prepared, so none is warned about).

Modules whose forward is not just their dequantized weight keep their prepared kernel: `int8-a8` quantizes
its input per token at run time, so it stays a `NanoLinear` (and a head tied to an `int8-a8` table stays a
`NanoTiedHead`). A checkpoint with such modules is loaded by the nano loader, then its weight-only modules are
replaced, except mixture-of-experts projections, which stay in their `NanoExperts` (kernels).

`kernels`: the checkpoint as transformers loads it for serving, every module through its prepared kernel
(on a CPU without a fast kernel for a scheme, that is the reference, which dequantizes on every call).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import NanoqError
from ..format.reference import dequantize
from ..format.validate import NanoCheckpoint

SCORING_MODES = ("dequantized", "kernels")


def load_quantized_model(checkpoint: NanoCheckpoint, dtype: torch.dtype,
                         scoring: str = "dequantized") -> tuple[nn.Module, dict]:
    """`(model, description)`: the transformers model of `checkpoint` in eval mode, scored as `scoring` says, and
    what runs where (`{"mode", "dequantized_modules", "kernel_modules": {scheme: count}}`)."""
    from transformers import AutoModelForCausalLM

    if scoring not in SCORING_MODES:
        raise NanoqError(f"scoring {scoring!r} is not one of {', '.join(SCORING_MODES)}")
    schemes = list(checkpoint.quant_config.modules.values())
    if scoring == "dequantized" and not any(scheme.quantizes_activations for scheme in schemes):
        model, dequantized, kept = float_model_of(checkpoint, dtype), len(schemes), []
    else:
        model = AutoModelForCausalLM.from_pretrained(Path(checkpoint.directory), dtype=dtype).eval()
        dequantized, kept = 0, schemes
        if scoring == "dequantized":
            dequantized = dequantize_weight_only_modules(model, checkpoint, dtype)
            experts = {module for found in checkpoint.experts_modules() for module in found.modules()}
            kept = [scheme for name, scheme in checkpoint.quant_config.modules.items()
                    if scheme.quantizes_activations or name in experts]
    kernels = dict(sorted(Counter(scheme.name for scheme in kept).items()))
    return model, {"mode": scoring, "dequantized_modules": dequantized, "kernel_modules": kernels}


def float_model_of(checkpoint: NanoCheckpoint, dtype: torch.dtype) -> nn.Module:
    """The float transformers model (eval mode, `dtype`) of a checkpoint whose quantized modules are all
    weight-only: its float tensors, and each quantized weight dequantized once by the reference."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    directory = Path(checkpoint.directory)
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise NanoqError(f"{directory}: transformers has no causal LM class for model type {config.model_type!r}")
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in checkpoint.tensors.items(sorted(checkpoint.manifest.get("float_tensors", {})))}
    for name, scheme in checkpoint.quant_config.modules.items():
        weight = dequantize(checkpoint.module_tensors(name), scheme, *checkpoint.module_shape(name), dtype)
        state[f"{name}.weight"] = weight.contiguous()  # [N, K] row-major, as nn.Linear holds it
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                              output_loading_info=True)
    unloaded = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(info["mismatched_keys"])
    if unloaded:
        raise NanoqError(f"{directory}: the float model of this checkpoint does not take its tensors "
                         f"(missing, unexpected or mismatched: {', '.join(map(str, unloaded[:5]))})")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def dequantize_weight_only_modules(model: nn.Module, checkpoint: NanoCheckpoint, dtype: torch.dtype) -> int:
    """Replace each weight-only nano module of `model` (loaded from `checkpoint`) by an `nn.Linear` /
    `nn.Embedding` holding its reference-dequantized weight in `dtype`, and a head tied to such a table by a
    linear sharing that weight; returns the number of modules replaced. `int8-a8` modules are left as they are."""
    from ..engines.transformers import NanoEmbedding, NanoLinear

    replaced = 0
    experts = {module for found in checkpoint.experts_modules() for module in found.modules()}
    for name, scheme in checkpoint.quant_config.modules.items():
        if scheme.quantizes_activations or name in experts:  # experts stay in their NanoExperts' kernels
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child_name)
        out_features, in_features = checkpoint.module_shape(name)
        weight = dequantize(checkpoint.module_tensors(name), scheme, out_features, in_features, dtype)
        weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [N, K] row-major, as nn.Linear holds it
        if isinstance(module, NanoLinear):
            new = nn.Linear(in_features, out_features, bias=False, device="meta")
            new.weight, new.bias = weight, module.bias
        elif isinstance(module, NanoEmbedding):
            new = nn.Embedding(out_features, in_features, device="meta")
            new.weight = weight
        else:
            raise NanoqError(f"{checkpoint.directory}: quantized module '{name}' loaded as {type(module).__name__}, "
                             "not a NanoLinear or NanoEmbedding")
        setattr(parent, child_name, new)
        replaced += 1
    tied = checkpoint.quant_config.tied_lm_head
    if tied is not None and not checkpoint.quant_config.modules[tied].quantizes_activations:
        table = model.get_submodule(tied).weight
        head = nn.Linear(table.shape[1], table.shape[0], bias=False, device="meta")
        head.weight = table
        model.set_output_embeddings(head)
    return replaced
