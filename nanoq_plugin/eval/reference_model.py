"""The float model a nano checkpoint stands for: its source with every quantized weight replaced by the
reference dequantization (`format.reference`, the spec), and the inputs of int8-a8 linears quantized per token
(`format.activations`). Serving paths are tested equal to it; the quality benchmark and the quality gate
score it because it runs at float speed."""

from __future__ import annotations

import os

import torch

from ..errors import NanoqError
from ..format.activations import fake_quantize_per_token
from ..format.reference import dequantize
from ..format.validate import load_nano_checkpoint


def dequantized_float_model(source_dir: str | os.PathLike, nano_dir: str | os.PathLike):
    """transformers model of `source_dir` (float32, eval mode) carrying the dequantized weights of `nano_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    checkpoint = load_nano_checkpoint(nano_dir)
    # the checkpoint's float tensors, which a quantizer may have changed (AWQ folds scales into norms)
    state = model.state_dict()
    float_names = [name for name in checkpoint.manifest.get("float_tensors", {}) if name in state]
    with torch.no_grad():
        for name, tensor in checkpoint.tensors.items(float_names):
            state[name].copy_(tensor.to(torch.float32))
    modules = checkpoint.quant_config.modules
    experts = _expert_parts(model, checkpoint)
    for module_name, scheme in modules.items():
        if module_name in experts:
            _set_expert_weight(*experts[module_name], checkpoint, module_name, scheme)
            continue
        module = model.get_submodule(module_name)
        module.weight.data = dequantize(checkpoint.module_tensors(module_name), scheme, *module.weight.shape)
        if scheme.quantizes_activations and isinstance(module, torch.nn.Linear):
            quantize_inputs(module)
    tied = checkpoint.quant_config.tied_lm_head
    if tied is not None:
        model.lm_head.weight = model.get_submodule(tied).weight
        if modules[tied].quantizes_activations:  # the head computes in the table's scheme
            quantize_inputs(model.lm_head)
    return model.eval()


def _expert_parts(model, checkpoint) -> dict:
    """Stored expert projection -> (the fused parameter it fills in `model`, its role, its part), from
    `format.expert_tensors` (transformers' own conversion)."""
    parts = {}
    for experts in checkpoint.experts_modules():
        holder = model.get_submodule(experts.name)
        for role in experts.roles:
            for part in (part for per_expert in role.parts for part in per_expert):
                parts[part.module] = (getattr(holder, role.param), role, part)
    return parts


def _set_expert_weight(param, role, part, checkpoint, module_name: str, scheme) -> None:
    """Write the reference dequantization of expert projection `module_name` into its rows of `param`."""
    if scheme.quantizes_activations:
        raise NanoqError(f"{checkpoint.directory}: expert projection '{module_name}' is {scheme.name}: the float "
                         "reference model does not quantize experts' activations")
    weight = dequantize(checkpoint.module_tensors(module_name), scheme, *checkpoint.module_shape(module_name),
                        param.dtype)
    rows = slice(part.rows.start, part.rows.stop, part.rows.step)
    with torch.no_grad():
        if role.transposed:
            param[part.expert][:, rows] = weight.t()
        else:
            param[part.expert][rows] = weight


def quantize_inputs(linear: torch.nn.Linear) -> None:
    """Make `linear` quantize its input per token (int8-a8) before its float matmul."""
    linear.register_forward_pre_hook(lambda module, args: (fake_quantize_per_token(args[0]), *args[1:]))
