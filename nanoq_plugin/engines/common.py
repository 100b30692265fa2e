"""What the serving-engine adapters (vLLM, SGLang) share: the scheme of a fused engine module, the role
of each stored tensor for the engine's sharding parameter classes, and the check that every stored
tensor of a quantized layer was loaded.

Roles (docs/FORMAT.md, "Tensor-parallel sharding"), for a linear of `N` outputs and `K` inputs:

| tensor                   | shape                     | role          | input dim | output dim |
|--------------------------|---------------------------|---------------|-----------|------------|
| qweight (int_group/int8) | `[K*b/32, N]` / `[K, N]`  | WEIGHT        | 0         | 1          |
| scales, zeros (group)    | `[K/G, N]`                | GROUP_SCALE   | 0         | 1          |
| scales (int8)            | `[N]`                     | CHANNEL_SCALE | replicated| 0          |
| codebook                 | `[parts, 2**b]`           | PART_TABLE    | replicated| replicated |
| signs (codebook)         | `[K]`                     | INPUT_VECTOR  | 0         | replicated |
| global_scale (nvfp4)     | `[1]`                     | REPLICATED    | replicated| replicated |

The role follows from each tensor's `format.tensor_spec.Sharding`, which its scheme kind declares.

A codebook module stores one table of levels `[2**b]` per checkpoint module; an engine layer that fuses q/k/v
or gate/up loads each part's table into its row of `codebook` (by the loader's shard id), so one fused layer
serves parts whose tables differ (`kernels.ops.PreparedParts`). The parts' `signs` must be identical: they
rotate the one input the parts share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import NanoqError
from ..format.layout import Sharding, TensorSpec, check_shape_fits, param_specs
from ..format.quant_config import NanoQuantConfig
from ..format.schemes import Scheme, SchemeKind
from ..kernels.ops import prepare_linear


class ParamRole(str, Enum):
    """How an engine shards one stored tensor (table in the module docstring)."""

    WEIGHT = "weight"
    GROUP_SCALE = "group_scale"
    CHANNEL_SCALE = "channel_scale"
    PART_TABLE = "part_table"
    INPUT_VECTOR = "input_vector"
    REPLICATED = "replicated"


ROLE_OF = {Sharding.INPUT_OUTPUT: ParamRole.GROUP_SCALE, Sharding.OUTPUT: ParamRole.CHANNEL_SCALE,
           Sharding.PART_TABLE: ParamRole.PART_TABLE, Sharding.INPUT: ParamRole.INPUT_VECTOR,
           Sharding.REPLICATED: ParamRole.REPLICATED}


QKV_PART_INDEX = {"q": 0, "k": 1, "v": 2}


def part_table_parameter(base: type) -> type:
    """A parameter class for `codebook [parts, 2**b]` derived from an engine's `BasevLLMParameter` (vLLM and
    SGLang both name it so and call the same four load methods): part `i`'s `[2**b]` table, given with the
    shard id of a fused layer (`q`/`k`/`v`, or `0`/`1` for gate/up) or none for an unfused one, is copied
    into row `i`, whole on every tensor-parallel rank."""

    class PartTableParameter(base):
        def _load_part(self, loaded_weight: torch.Tensor, shard_id: str | int = 0) -> None:
            index = QKV_PART_INDEX.get(shard_id, shard_id)
            if tuple(loaded_weight.shape) != tuple(self.data.shape[1:]):
                raise NanoqError(f"tensor '{getattr(self, 'nano_name', 'codebook')}' has shape "
                                 f"{list(loaded_weight.shape)}, expected {list(self.data.shape[1:])}")
            self.data[index].copy_(loaded_weight)

        def load_column_parallel_weight(self, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
            self._load_part(loaded_weight)

        def load_row_parallel_weight(self, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
            self._load_part(loaded_weight)

        def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
            self._load_part(loaded_weight, kwargs["shard_id"])

        def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
            self._load_part(loaded_weight, kwargs["shard_id"])

    PartTableParameter.__qualname__ = PartTableParameter.__name__ = f"NanoPartTable{base.__name__}"
    return PartTableParameter


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


def checkpoint_part_sizes(output_partition_sizes: Sequence[int], checkpoint_parts: int) -> list[int]:
    """The output widths of the checkpoint modules behind an engine layer: the engine's partition sizes, or their
    sum where the checkpoint stores the fused module whole (Phi-3's `qkv_proj`: one stored module, one scheme)."""
    sizes = list(output_partition_sizes)
    return sizes if len(sizes) == checkpoint_parts else [sum(sizes)]


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
    return schemes[0]


def layer_params(scheme: Scheme, prefix: str, out_features: int, in_features: int, input_size: int,
                 parts: int = 1) -> list[LayerParam]:
    """The tensors of one rank's `[out_features, in_features]` slice of a linear whose full input dim is `input_size`
    (`parts`: the checkpoint modules an engine layer fuses, each with its own codebook).

    Raises NanoqError naming `prefix` when a tensor-parallel split of the input dim cuts a group.
    """
    block = scheme.kind.input_block(scheme)
    if in_features != input_size and in_features % block:
        raise NanoqError(
            f"{prefix}: input features per tensor-parallel rank ({in_features} of {input_size}) must be a multiple "
            f"of the group size {block}: use a smaller tensor-parallel size"
        )
    check_shape_fits(scheme, out_features, in_features, prefix)
    params = []
    for name, spec in param_specs(scheme, out_features, in_features).items():
        role = ParamRole.WEIGHT if name == "qweight" else ROLE_OF[spec.sharding]
        if role is ParamRole.PART_TABLE:
            spec = TensorSpec((parts, *spec.shape), spec.dtype, spec.sharding)
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

    def wrap(self, name: str, loader: Callable, parts_agree: bool = False) -> Callable:
        """`loader` that also counts a call for tensor `name`; with `parts_agree`, every part must load the same
        values (a codebook's `signs`), else NanoqError names the layer and tensor."""

        def counting_loader(param, *args, **kwargs):
            before = param.data.clone() if parts_agree and self.counts[name] else None
            self.counts[name] += 1
            result = loader(param, *args, **kwargs)
            if before is not None and not torch.equal(before, param.data):
                raise NanoqError(f"{self.prefix}: tensor '{name}' differs between the parts this engine layer fuses "
                                 "(they share one input, so they must share its rotation)")
            return result

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
    layer: torch.nn.Module, scheme: Scheme, prefix: str, part_sizes: Sequence[int], in_features: int,
    input_size: int, loader: Callable, params_dtype: torch.dtype, param_classes: Mapping[ParamRole, type],
) -> None:
    """Register the stored tensors of one rank's `[sum(part_sizes), in_features]` slice (`part_sizes`: the output
    widths of the checkpoint modules the layer fuses) as the engine's parameter objects (`param_classes`: its
    ModelWeightParameter / GroupQuantScaleParameter / ChannelQuantScaleParameter / RowvLLMParameter and
    `part_table_parameter(BasevLLMParameter)`, which vLLM and SGLang construct alike), each with a loader that
    `LoadCounter` counts (one call per part)."""
    parts = len(part_sizes)
    out_features = sum(part_sizes)
    params = layer_params(scheme, prefix, out_features, in_features, input_size, parts)
    layer.nano_counter = LoadCounter(prefix, scheme, [p.name for p in params], parts)
    layer.nano_param_names = [p.name for p in params]
    layer.nano_shape = (out_features, in_features)
    layer.nano_part_sizes = list(part_sizes)
    layer.nano_act_dtype = params_dtype
    for entry in params:
        data = torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
        counting_loader = layer.nano_counter.wrap(entry.name, loader,
                                                  parts_agree=entry.role is ParamRole.INPUT_VECTOR)
        param_class = param_classes[entry.role]
        if entry.role is ParamRole.CHANNEL_SCALE:
            param = param_class(data=data, output_dim=0, weight_loader=counting_loader)
        elif entry.role in (ParamRole.PART_TABLE, ParamRole.REPLICATED):
            param = param_class(data=data, weight_loader=counting_loader)
        elif entry.role is ParamRole.INPUT_VECTOR:
            param = param_class(data=data, input_dim=0, weight_loader=counting_loader)
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
                              where=prefix, part_sizes=layer.nano_part_sizes)
    for name in layer.nano_param_names:
        delattr(layer, name)
    for name, tensor in prepared.tensors.items():
        layer.register_parameter(f"nano_{name}", torch.nn.Parameter(tensor, requires_grad=False))
    layer.nano_prepared = prepared
