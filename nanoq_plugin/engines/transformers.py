"""transformers integration: the `nano` quantization config and HfQuantizer, registered on import.

`_process_model_before_weight_loading` swaps every `nn.Linear` named in `quantization_config["modules"]`
for a `NanoLinear` whose parameters carry the checkpoint's names (`qweight`, `scales`, `zeros`), so the
ordinary weight loader fills them; the forward pass calls `kernels.ops`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format.layout import param_specs
from ..format.quant_config import QUANT_METHOD, NanoQuantConfig
from ..format.schemes import Scheme
from ..format.validate import load_nano_checkpoint
from ..kernels.ops import quantized_linear


class NanoConfig(QuantizationConfigMixin):
    """transformers view of a nano `quantization_config` (the JSON is kept verbatim)."""

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = 1, schemes=None, modules=None, **kwargs):
        self.quant_method = quant_method
        self.format_version = format_version
        self.schemes = schemes or {}
        self.modules = modules or {}

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "schemes": self.schemes,
            "modules": self.modules,
        }

    def parsed(self) -> NanoQuantConfig:
        """The validated format-layer config."""
        return NanoQuantConfig.from_dict(self.to_dict(), "config.json: quantization_config")


class NanoLinear(nn.Module):
    """A linear stored in a nano scheme; parameters named and shaped as in `format.layout.param_specs`."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for name, spec in param_specs(scheme, out_features, in_features).items():
            self.register_parameter(name, nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype), requires_grad=False))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in_features]` -> `[..., out_features]` in x.dtype."""
        return quantized_linear(x, dict(self.named_parameters(recurse=False)), self.scheme, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


def replace_linears(model: nn.Module, modules: dict[str, Scheme]) -> int:
    """Swap each `nn.Linear` named in `modules` for a `NanoLinear` on the same device; returns the count."""
    replaced = 0
    for name, scheme in modules.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_config names '{name}', which is not an nn.Linear in this model")
        with torch.device(linear.weight.device):
            new = NanoLinear(linear.in_features, linear.out_features, scheme, linear.bias is not None, linear.weight.dtype)
        setattr(parent, child_name, new)
        replaced += 1
    return replaced


class NanoHfQuantizer(HfQuantizer):
    """Loads pre-quantized nano checkpoints (quantizing happens offline with `nanoq quantize`)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Validate the checkpoint folder (tensors vs manifest vs config), then swap in `NanoLinear`s."""
        if checkpoint_files:
            load_nano_checkpoint(Path(checkpoint_files[0]).parent)
        replace_linears(model, self.quantization_config.parsed().modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register `nano` with transformers; safe to call more than once."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NanoConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NanoHfQuantizer)
