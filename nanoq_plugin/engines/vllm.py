"""vLLM integration: the `nano` QuantizationConfig, linear and embedding methods, registered by the entry
point `vllm.general_plugins: nano = nanoq_plugin.engines.vllm:register` (vLLM calls it in every process).

Weights are created as vLLM parameter objects, so vLLM's own loaders shard them:
`qweight`/`scales`/`zeros` have the input dim on dim 0 and the output dim on dim 1 (docs/FORMAT.md):
column-parallel, QKV and merged gate/up layers slice dim 1; row-parallel layers slice dim 0 (which
needs whole groups per rank); per-channel int8 scales `[N]` are sliced with N or replicated. A codebook
layer holds one table per fused part (`[parts, 2**b]`, loaded by shard id) and the rotation's `signs [K]`
(sliced like K on row-parallel layers), see `common`.
A quantized embedding table is stored like a linear with N = vocab; each rank loads its vocab slice.
Quantized experts of a mixture-of-experts block are served by `vllm_moe.NanoFusedMoEMethod`.
After loading, every layer is repacked once for its kernel (`kernels.ops.prepare_linear`, docs/kernels.md)
and the stored copies are freed.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)

from ..errors import NanoqError
from .common import (ParamRole, checkpoint_part_sizes, fused_parts, fused_scheme, part_table_parameter,
                     register_stored_params, swap_in_prepared)
from .vllm_moe import nano_moe_method
from ..format.quant_config import QUANT_METHOD, NanoQuantConfig
from ..format.schemes import Scheme
from ..format.validate import load_nano_checkpoint
from ..kernels.dispatch import refuse_slow_layers
from ..kernels.ops import PreparedLinear, apply_linear, gather_embedding


class NanoVllmConfig(QuantizationConfig):
    """vLLM view of a nano checkpoint's `quantization_config` (module names resolved to schemes)."""

    def __init__(self, quant_config: NanoQuantConfig | None = None) -> None:
        super().__init__()
        if quant_config is None:  # vLLM builds the config without arguments for a float checkpoint
            with _one_line_exit():
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
        with _one_line_exit():
            return cls(NanoQuantConfig.from_dict(config, "config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Validate a local checkpoint (config, manifest, every tensor's name, dtype and shape) before loading;
        under NANOQ_STRICT_KERNELS=1 on the CPU, refuse a layer that only the reference kernel runs (here, in the
        API server's process, so the refusal is one line; vLLM-CPU computes in bfloat16)."""
        if not Path(model_name).is_dir():
            return
        from vllm.platforms import current_platform

        with _one_line_exit():
            checkpoint = load_nano_checkpoint(model_name)
            if current_platform.is_cpu():
                tables = {self._embedding_module(), checkpoint.quant_config.tied_lm_head}
                layers = [(module, scheme, *checkpoint.module_shape(module), module in tables)
                          for module, scheme in checkpoint.quant_config.modules.items()]
                refuse_slow_layers(layers, torch.bfloat16, "cpu")

    def _scheme_of(self, prefix: str) -> Scheme | None:
        """Scheme of a vLLM module: fused modules (qkv_proj, gate_up_proj) expand to their checkpoint parts."""
        return fused_scheme(self.quant_config, prefix, self.packed_modules_mapping, "vLLM")

    def _embedding_module(self) -> str | None:
        """The checkpoint name of the quantized token embedding (vLLM's Llama builds it without a prefix)."""
        names = [m for m in self.quant_config.modules if m.rpartition(".")[2] == "embed_tokens"]
        return names[0] if len(names) == 1 else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            tied = self.quant_config.tied_lm_head
            if tied is not None:
                return NanoEmbeddingMethod(self.quant_config.modules[tied], prefix, tied_to=tied)
            scheme = self.quant_config.scheme_of(prefix)
            return None if scheme is None else NanoEmbeddingMethod(scheme, prefix)
        if isinstance(layer, VocabParallelEmbedding):
            name = prefix if prefix in self.quant_config.modules else (self._embedding_module() if not prefix else None)
            return None if name is None else NanoEmbeddingMethod(self.quant_config.modules[name], name)
        if isinstance(layer, RoutedExperts):
            return nano_moe_method(self.quant_config, layer, prefix)
        if isinstance(layer, LinearBase):
            scheme = self._scheme_of(prefix)
            if scheme is None:
                return UnquantizedLinearMethod()
            return NanoLinearMethod(scheme, prefix, len(fused_parts(prefix, self.packed_modules_mapping)))
        return None


PARAM_CLASSES = {ParamRole.WEIGHT: ModelWeightParameter, ParamRole.GROUP_SCALE: GroupQuantScaleParameter,
                 ParamRole.CHANNEL_SCALE: ChannelQuantScaleParameter, ParamRole.INPUT_VECTOR: RowvLLMParameter,
                 ParamRole.PART_TABLE: part_table_parameter(BasevLLMParameter),
                 ParamRole.REPLICATED: BasevLLMParameter}


@register_weight_loader_v2_supported_method
class NanoLinearMethod(LinearMethodBase):
    """Linear method for one nano scheme; creates the stored tensors as vLLM parameters."""

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
        """Register `qweight`, `scales` (and `zeros`) for this rank's `[sum(output_partition_sizes), K_rank]`."""
        register_stored_params(layer, self.scheme, self.prefix,
                               checkpoint_part_sizes(output_partition_sizes, self.checkpoint_parts),
                               input_size_per_partition,
                               input_size, extra_weight_attrs["weight_loader"], params_dtype, PARAM_CLASSES)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        swap_in_prepared(layer, self.scheme, self.prefix)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(x, layer.nano_prepared, bias)


class NanoEmbeddingMethod(QuantizeMethodBase):
    """A quantized token embedding (`embedding`) or LM head (`apply`); `tied_to` names the embedding a tied
    head shares, in which case the head holds no tensors of its own."""

    def __init__(self, scheme: Scheme, prefix: str, tied_to: str | None = None) -> None:
        self.scheme = scheme
        self.prefix = prefix
        self.tied_to = tied_to

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
        """This rank's vocab slice `[V_rank (padded), H]`, stored like a linear with N = V_rank."""
        if self.tied_to is not None:
            return
        def vocab_slice_loader(param, loaded: torch.Tensor) -> None:
            # every stored tensor has the vocab on its last dim; rows past the real vocab stay zero
            start = layer.shard_indices.org_vocab_start_index
            size = layer.shard_indices.org_vocab_end_index - start
            vocab_dim = param.data.dim() - 1
            if loaded.shape[vocab_dim] < start + size:
                raise NanoqError(f"{self.prefix}: tensor '{param.nano_name}' has {loaded.shape[vocab_dim]} vocab "
                                 f"entries, the model needs {start + size}")
            param.data.zero_()
            param.data.narrow(vocab_dim, 0, size).copy_(loaded.narrow(vocab_dim, start, size))

        register_stored_params(layer, self.scheme, self.prefix, [sum(output_partition_sizes)],
                               input_size_per_partition, input_size, vocab_slice_loader, params_dtype, PARAM_CLASSES)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.tied_to is None:
            swap_in_prepared(layer, self.scheme, self.prefix, is_embedding=True)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """Point a tied head at the embedding (its prepared tensors exist only after loading)."""
        if not isinstance(getattr(embed_tokens, "quant_method", None), NanoEmbeddingMethod):
            raise NanoqError(f"{self.prefix}: tied to '{self.tied_to}', which vLLM did not build as a nano embedding")
        layer.nano_tied_to = [embed_tokens]  # a list, so the embedding is not registered as a submodule twice
        return layer

    def _prepared(self, layer: torch.nn.Module) -> PreparedLinear:
        return layer.nano_tied_to[0].nano_prepared if self.tied_to is not None else layer.nano_prepared

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return gather_embedding(input_, self._prepared(layer), layer.nano_act_dtype)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(x, self._prepared(layer), bias)


@contextmanager
def _one_line_exit():
    """A NanoqError found while vLLM builds its config (the API server's process, before any engine starts) ends
    the process with one line `error: ...` and status 1, instead of vLLM's stack: SystemExit prints no traceback.
    Only these config hooks are wrapped; nothing process-wide is changed."""
    try:
        yield
    except NanoqError as error:
        raise SystemExit(f"error: {error}") from None


def register() -> None:
    """Entry point for `vllm.general_plugins`: register `nano` (idempotent)."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        if get_quantization_config(QUANT_METHOD) is NanoVllmConfig:
            return
    except ValueError:  # not registered yet
        pass
    register_quantization_config(QUANT_METHOD)(NanoVllmConfig)
