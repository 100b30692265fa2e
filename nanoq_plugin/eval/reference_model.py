"""The float model a nano checkpoint stands for: its source with every quantized weight replaced by the
reference dequantization (`format.reference`, the spec). Serving paths are tested equal to it; the quality
benchmark scores it because it runs at float speed."""

from __future__ import annotations

import os

import torch

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
    for module_name, scheme in checkpoint.quant_config.modules.items():
        module = model.get_submodule(module_name)
        module.weight.data = dequantize(checkpoint.module_tensors(module_name), scheme, *module.weight.shape)
    if checkpoint.quant_config.tied_lm_head is not None:
        model.lm_head.weight = model.get_submodule(checkpoint.quant_config.tied_lm_head).weight
    return model.eval()
