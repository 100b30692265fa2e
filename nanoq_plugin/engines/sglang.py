"""SGLang integration: the `nano` QuantizationConfig and linear method, registered by the entry point
`sglang.srt.plugins: nano = nanoq_plugin.engines.sglang:register` (SGLang's `load_plugins()` calls it
before it parses server arguments, and again in the scheduler and every other process).

Weights are created as SGLang parameter objects (`sglang.srt.layers.parameter`), so SGLang's own
`weight_loader_v2` shards them: `qweight`/`scales`/`zeros` have the input dim on dim 0 and the output
dim on dim 1 (docs/FORMAT.md); column-parallel, QKV and merged gate/up layers slice dim 1, row-parallel
layers slice dim 0 (whole groups per rank); per-channel int8 scales `[N]` are sliced with N or replicated;
a codebook layer holds one table per fused part and the rotation's `signs` (see `common`).
After loading each layer is repacked for its kernel (`kernels.ops`); float modules get SGLang's `UnquantizedLinearMethod`.
A checkpoint with quantized experts (a mixture of experts) is refused when the config is built: SGLang's MoE
layers have their own method API, which this adapter does not implement yet; float experts are SGLang's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sglang.srt.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase
from sglang.srt.layers.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)
from sglang.srt.layers.quantization.base_config import LinearMethodBase, QuantizationConfig, QuantizeMethodBase
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from ..errors import NanoqError
from ..format.quant_config import QUANT_METHOD, NanoQuantConfig
from ..format.schemes import Scheme
from ..format.validate import load_nano_checkpoint
from ..kernels.ops import apply_linear
from .common import (ParamRole, checkpoint_part_sizes, fused_parts, fused_scheme, part_table_parameter,
                     register_stored_params, swap_in_prepared)
from .expert_schemes import quantized_expert_blocks

PARAM_CLASSES = {ParamRole.WEIGHT: ModelWeightParameter, ParamRole.GROUP_SCALE: GroupQuantScaleParameter,
                 ParamRole.CHANNEL_SCALE: ChannelQuantScaleParameter, ParamRole.INPUT_VECTOR: RowvLLMParameter,
                 ParamRole.PART_TABLE: part_table_parameter(BasevLLMParameter),
                 ParamRole.REPLICATED: BasevLLMParameter}

# SGLang's Llama/Qwen classes declare no packed_modules_mapping; its own quantization utils fall back to these.
FALLBACK_FUSED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class NanoSglangConfig(QuantizationConfig):
    """SGLang view of a nano checkpoint's `quantization_config` (module names resolved to schemes)."""

    def __init__(self, quant_config: NanoQuantConfig | None = None, packed_modules_mapping: dict | None = None) -> None:
        super().__init__()
        if quant_config is None:
            raise NanoqError("--quantization nano: the checkpoint's config.json has no nano quantization_config "
                             "(quantize it first with `nanoq quantize`)")
        experts = quantized_expert_blocks(quant_config)
        if experts:
            more = f" and {len(experts) - 1} more" if len(experts) > 1 else ""
            raise NanoqError(f"config.json: the experts of {experts[0]}{more} are quantized, and the SGLang adapter "
                             "has no mixture-of-experts method yet: serve this checkpoint with vLLM (--quantization "
                             "nano) or keep the experts float")
        self.quant_config = quant_config
        self.packed_modules_mapping = dict(packed_modules_mapping or {})

    def __repr__(self) -> str:
        return f"NanoSglangConfig({len(self.quant_config.modules)} quantized modules)"

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
    def from_config(cls, config: dict) -> NanoSglangConfig:
        """Parse config.json's `quantization_config`; SGLang adds `packed_modules_mapping` and `hf_config` to it.

        A local checkpoint is validated first (config, manifest, every tensor's name, dtype and shape).
        """
        model_dir = getattr(config.get("hf_config"), "name_or_path", "")
        if model_dir and Path(model_dir).is_dir():
            load_nano_checkpoint(model_dir)
        return cls(NanoQuantConfig.from_dict(config, "config.json: quantization_config"),
                   config.get("packed_modules_mapping"))

    def get_scaled_act_names(self) -> list[str]:
        return []

    def scheme_of(self, prefix: str) -> Scheme | None:
        """Scheme of SGLang module `prefix`; fused modules (qkv_proj, gate_up_proj) expand to their checkpoint parts."""
        return fused_scheme(self.quant_config, prefix, {**FALLBACK_FUSED_MODULES, **self.packed_modules_mapping},
                            "SGLang")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            scheme = self.scheme_of(prefix)
            if scheme is None:
                return UnquantizedLinearMethod()
            mapping = {**FALLBACK_FUSED_MODULES, **self.packed_modules_mapping}
            return NanoSglangLinearMethod(scheme, prefix, len(fused_parts(prefix, mapping)))
        if self.quant_config.scheme_of(prefix) is not None:  # e.g. an embedding table or LM head
            raise NanoqError(f"config.json: {prefix} is quantized, but the SGLang adapter quantizes only linear "
                             f"layers, not {type(layer).__name__} (keep this module in float)")
        return None


class NanoSglangLinearMethod(LinearMethodBase):
    """Linear method for one nano scheme; creates the stored tensors as SGLang parameters."""

    def __init__(self, scheme: Scheme, prefix: str, checkpoint_parts: int = 1) -> None:
        self.scheme = scheme
        self.prefix = prefix
        self.checkpoint_parts = checkpoint_parts  # the stored modules behind this layer (3 for q/k/v)

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
        """Register `qweight`, `scales` (and `zeros`) for this rank's `[sum(output_partition_sizes), K_rank]` slice."""
        register_stored_params(layer, self.scheme, self.prefix,
                               checkpoint_part_sizes(output_partition_sizes, self.checkpoint_parts),
                               input_size_per_partition,
                               input_size, extra_weight_attrs["weight_loader"], params_dtype, PARAM_CLASSES)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Refuse to serve with a tensor the checkpoint did not provide (SGLang does not check quantized layers),
        then repack once for the kernel and free the stored copy."""
        swap_in_prepared(layer, self.scheme, self.prefix)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x [..., K_rank]` (bf16/fp16/fp32) -> `[..., N_rank]` in x.dtype."""
        return apply_linear(x, layer.nano_prepared, bias)


def register() -> None:
    """Entry point for `sglang.srt.plugins`: make `nano` a quantization method and a `--quantization` choice.

    Idempotent. SGLang has no registration function: its registries are the dicts `QUANTIZATION_METHODS`
    (and `CPU_QUANTIZATION_METHODS`, consulted on CPUs with AMX), the list `QUANTIZATION_CHOICES` (extended
    with its `add_quantization_method_choices`) and `WEIGHT_LOADER_V2_SUPPORTED` (linear-method class names).
    """
    from sglang.srt.layers.quantization import CPU_QUANTIZATION_METHODS, QUANTIZATION_METHODS
    from sglang.srt.server_args import QUANTIZATION_CHOICES, add_quantization_method_choices

    QUANTIZATION_METHODS[QUANT_METHOD] = NanoSglangConfig
    CPU_QUANTIZATION_METHODS[QUANT_METHOD] = NanoSglangConfig
    if QUANT_METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_METHOD])
    if NanoSglangLinearMethod.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
        WEIGHT_LOADER_V2_SUPPORTED.append(NanoSglangLinearMethod.__name__)
