"""vLLM integration: the `nano` QuantizationConfig and linear method, registered by the entry point
`vllm.general_plugins: nano = nanoq_plugin.engines.vllm:register` (vLLM calls it in every process).

Weights are created as vLLM parameter objects, so vLLM's own loaders shard them:
`qweight`/`scales`/`zeros` have the input dim on dim 0 and the output dim on dim 1 (docs/FORMAT.md):
column-parallel, QKV and merged gate/up layers slice dim 1; row-parallel layers slice dim 0 (which
needs whole groups per rank); per-channel int8 scales `[N]` are sliced with N or replicated.
The forward pass is `kernels.ops.quantized_linear` (torch custom ops, opaque to torch.compile).
"""

from __future__ import annotations

from pathlib import Path

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
)

from ..errors import NanoqError
from ..format.layout import param_specs
from ..format.quant_config import QUANT_METHOD, NanoQuantConfig
from ..format.schemes import Scheme, SchemeKind
from ..format.validate import load_nano_checkpoint
from ..kernels.ops import quantized_linear


class NanoVllmConfig(QuantizationConfig):
    """vLLM view of a nano checkpoint's `quantization_config` (module names resolved to schemes)."""

    def __init__(self, quant_config: NanoQuantConfig | None = None) -> None:
        super().__init__()
        if quant_config is None:  # vLLM builds the config without arguments for a float checkpoint
            raise NanoqError("--quantization nano: the checkpoint's config.json has no nano quantization_config "
                             "(quantize it first with `nanoq quantize`)")
        self.quant_config = quant_config

    def __repr__(self) -> str:
        return f"NanoVllmConfig({len(self.quant_config.modules)} quantized modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "NanoVllmConfig":
        return cls(NanoQuantConfig.from_dict(config, "config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Validate a local checkpoint (config, manifest, every tensor's name, dtype and shape) before loading."""
        if Path(model_name).is_dir():
            load_nano_checkpoint(model_name)

    def _scheme_of(self, prefix: str) -> Scheme | None:
        """Scheme of a vLLM module: fused modules (qkv_proj, gate_up_proj) expand to their checkpoint parts."""
        stem, _, name = prefix.rpartition(".")
        parts = [f"{stem}.{p}" if stem else p for p in self.packed_modules_mapping.get(name, [name])]
        schemes = {self.quant_config.scheme_of(part) for part in parts}
        if len(schemes) > 1:
            found = ", ".join(f"{p}={(s.name if s else 'float')}" for p, s in
                              ((p, self.quant_config.scheme_of(p)) for p in parts))
            raise NanoqError(f"config.json: {prefix} is fused by vLLM but its parts use different schemes ({found})")
        return schemes.pop()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            scheme = self._scheme_of(prefix)
            return UnquantizedLinearMethod() if scheme is None else NanoLinearMethod(scheme, prefix)
        return None


@register_weight_loader_v2_supported_method
class NanoLinearMethod(LinearMethodBase):
    """Linear method for one nano scheme; creates the stored tensors as vLLM parameters."""

    def __init__(self, scheme: Scheme, prefix: str) -> None:
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        """Register `qweight`, `scales` (and `zeros`) for this rank's `[sum(output_partition_sizes), K_rank]`."""
        loader = extra_weight_attrs["weight_loader"]
        out_features, in_features = sum(output_partition_sizes), input_size_per_partition
        if self.scheme.kind is SchemeKind.INT_GROUP and in_features % self.scheme.group_size:
            raise NanoqError(
                f"{self.prefix}: input features per tensor-parallel rank ({in_features} of {input_size}) must be a "
                f"multiple of the group size {self.scheme.group_size}: use a smaller --tensor-parallel-size"
            )
        specs = param_specs(self.scheme, out_features, in_features)
        loaded: dict[str, int] = {}
        layer.nano_loads = loaded
        layer.nano_expected_loads = len(output_partition_sizes)
        layer.nano_param_names = list(specs)

        def counting_loader(param, *args, **kwargs):
            loaded[param.nano_name] = loaded.get(param.nano_name, 0) + 1
            return loader(param, *args, **kwargs)

        for name, spec in specs.items():
            data = torch.empty(spec.shape, dtype=spec.dtype)
            if name == "scales" and self.scheme.kind is SchemeKind.INT8_CHANNEL:
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=counting_loader)
            elif name == "qweight":
                param = ModelWeightParameter(data=data, input_dim=0, output_dim=1, weight_loader=counting_loader)
            else:
                param = GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=counting_loader)
            param.nano_name = name
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse to serve with a tensor the checkpoint did not provide (vLLM does not check quantized models)."""
        for name in layer.nano_param_names:
            count = layer.nano_loads.get(name, 0)
            if count < layer.nano_expected_loads:
                raise NanoqError(
                    f"{self.prefix}: tensor '{name}' ({self.scheme.name}) was not found in the checkpoint "
                    f"(loaded {count} of {layer.nano_expected_loads} parts)"
                )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        tensors = {name: getattr(layer, name) for name in layer.nano_param_names}
        return quantized_linear(x, tensors, self.scheme, bias)


def register() -> None:
    """Entry point for `vllm.general_plugins`: register `nano` (idempotent)."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        if get_quantization_config(QUANT_METHOD) is NanoVllmConfig:
            return
    except ValueError:  # not registered yet
        pass
    register_quantization_config(QUANT_METHOD)(NanoVllmConfig)
