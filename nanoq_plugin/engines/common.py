"""What the serving-engine adapters (vLLM, SGLang) share: the scheme of a fused engine module, the role
of each stored tensor for the engine's sharding parameter classes, and the check that every stored
tensor of a quantized layer was loaded.

Roles (docs/FORMAT.md, "Tensor-parallel sharding"), for a linear of `N` outputs and `K` inputs:

| tensor                   | shape                     | role          | input dim | output dim |
|--------------------------|---------------------------|---------------|-----------|------------|
| qweight (int_group/int8) | `[K*b/32, N]` / `[K, N]`  | WEIGHT        | 0         | 1          |
| scales, zeros (group)    | `[K/G, N]`                | GROUP_SCALE   | 0         | 1          |
| scales (int8)            | `[N]`                     | CHANNEL_SCALE | replicated| 0          |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import NanoqError
from ..format.layout import TensorSpec, check_shape_fits, param_specs
from ..format.quant_config import NanoQuantConfig
from ..format.schemes import Scheme, SchemeKind
from ..kernels.ops import prepare_linear


class ParamRole(str, Enum):
    """How an engine shards one stored tensor (table in the module docstring)."""

    WEIGHT = "weight"
    GROUP_SCALE = "group_scale"
    CHANNEL_SCALE = "channel_scale"


@dataclass(frozen=True)
class LayerParam:
    """One tensor to register on an engine layer: its name (`qweight`, `scales`, `zeros`), spec and role."""

    name: str
    spec: TensorSpec
    role: ParamRole


def fused_parts(prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]]) -> list[str]:
    """Checkpoint module names behind engine module `prefix`: `...qkv_proj` -> `...q_proj`, `...k_proj`, `...v_proj`."""
    stem, _, name = prefix.rpartition(".")
    parts = packed_modules_mapping.get(name)
    if not isinstance(parts, (list, tuple)):  # not fused (or a nested per-submodel mapping)
        parts = [name]
    return [f"{stem}.{part}" if stem else part for part in parts]


def fused_scheme(
    config: NanoQuantConfig, prefix: str, packed_modules_mapping: Mapping[str, Sequence[str]], engine: str
) -> Scheme | None:
    """The one scheme of engine module `prefix` (None = float); NanoqError if its fused parts disagree."""
    parts = fused_parts(prefix, packed_modules_mapping)
    schemes = [config.scheme_of(part) for part in parts]
    if len(set(schemes)) > 1:
        found = ", ".join(f"{part}={scheme.name if scheme else 'float'}" for part, scheme in zip(parts, schemes))
        raise NanoqError(f"config.json: {prefix} is fused by {engine} but its parts use different schemes ({found})")
    if schemes[0] is not None and schemes[0].kind is SchemeKind.NVFP4:
        raise NanoqError(f"config.json: {prefix} is nvfp4, which {engine} serves natively: convert the checkpoint with "
                         "`nanoq export compressed-tensors DIR OUT` and serve OUT")
    if schemes[0] is not None and schemes[0].kind is SchemeKind.CODEBOOK:
        raise NanoqError(f"config.json: {prefix} is {schemes[0].name}: the {engine} adapter does not serve codebook "
                         "schemes yet (transformers does: AutoModelForCausalLM.from_pretrained)")
    return schemes[0]


def layer_params(scheme: Scheme, prefix: str, out_features: int, in_features: int, input_size: int) -> list[LayerParam]:
    """The tensors of one rank's `[out_features, in_features]` slice of a linear whose full input dim is `input_size`.

    Raises NanoqError naming `prefix` when a tensor-parallel split of the input dim cuts a group.
    """
    if scheme.kind is SchemeKind.INT_GROUP and in_features != input_size and in_features % scheme.group_size:
        raise NanoqError(
            f"{prefix}: input features per tensor-parallel rank ({in_features} of {input_size}) must be a multiple "
            f"of the group size {scheme.group_size}: use a smaller tensor-parallel size"
        )
    check_shape_fits(scheme, out_features, in_features, prefix)
    params = []
    for name, spec in param_specs(scheme, out_features, in_features).items():
        if name == "qweight":
            role = ParamRole.WEIGHT
        elif name == "scales" and scheme.kind is SchemeKind.INT8_CHANNEL:
            role = ParamRole.CHANNEL_SCALE
        else:
            role = ParamRole.GROUP_SCALE
        params.append(LayerParam(name, spec, role))
    return params


class LoadCounter:
    """Counts the engine's weight-loader calls per tensor of one quantized layer.

    A fused layer expects one call per part (3 for qkv, 2 for gate/up). Engines do not check that a
    quantized layer got all its tensors; `check` does, after loading.
    """

    def __init__(self, prefix: str, scheme: Scheme, names: Sequence[str], parts: int) -> None:
        self.prefix, self.scheme, self.parts = prefix, scheme, parts
        self.counts = {name: 0 for name in names}

    def wrap(self, name: str, loader: Callable) -> Callable:
        """`loader` that also counts a call for tensor `name`."""

        def counting_loader(param, *args, **kwargs):
            self.counts[name] += 1
            return loader(param, *args, **kwargs)

        return counting_loader

    def check(self) -> None:
        """Raise NanoqError naming the layer and tensor when a tensor was loaded for fewer parts than expected."""
        for name, count in self.counts.items():
            if count < self.parts:
                raise NanoqError(
                    f"{self.prefix}: tensor '{name}' ({self.scheme.name}) was not found in the checkpoint "
                    f"(loaded {count} of {self.parts} parts)"
                )


def register_stored_params(
    layer: torch.nn.Module, scheme: Scheme, prefix: str, out_features: int, in_features: int, input_size: int,
    parts: int, loader: Callable, params_dtype: torch.dtype, param_classes: Mapping[ParamRole, type],
) -> None:
    """Register the stored tensors of one rank's `[out_features, in_features]` slice as the engine's parameter
    objects (`param_classes`: its ModelWeightParameter / GroupQuantScaleParameter / ChannelQuantScaleParameter,
    which vLLM and SGLang construct alike), each with a loader that `LoadCounter` counts (`parts` calls each)."""
    params = layer_params(scheme, prefix, out_features, in_features, input_size)
    layer.nano_counter = LoadCounter(prefix, scheme, [p.name for p in params], parts)
    layer.nano_param_names = [p.name for p in params]
    layer.nano_shape = (out_features, in_features)
    layer.nano_act_dtype = params_dtype
    for entry in params:
        data = torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
        counting_loader = layer.nano_counter.wrap(entry.name, loader)
        param_class = param_classes[entry.role]
        if entry.role is ParamRole.CHANNEL_SCALE:
            param = param_class(data=data, output_dim=0, weight_loader=counting_loader)
        else:
            param = param_class(data=data, input_dim=0, output_dim=1, weight_loader=counting_loader)
        param.nano_name = entry.name
        layer.register_parameter(entry.name, param)


def swap_in_prepared(layer: torch.nn.Module, scheme: Scheme, prefix: str, is_embedding: bool = False) -> None:
    """After loading: refuse a tensor the checkpoint did not provide, repack the stored tensors once for the
    kernel (`kernels.ops.prepare_linear`), and replace them with the prepared ones (`layer.nano_prepared`)."""
    layer.nano_counter.check()
    stored = {name: getattr(layer, name).data for name in layer.nano_param_names}
    prepared = prepare_linear(stored, scheme, *layer.nano_shape, layer.nano_act_dtype, is_embedding=is_embedding,
                              where=prefix)
    for name in layer.nano_param_names:
        delattr(layer, name)
    for name, tensor in prepared.tensors.items():
        layer.register_parameter(f"nano_{name}", torch.nn.Parameter(tensor, requires_grad=False))
    layer.nano_prepared = prepared
