"""The kernels' public API: prepare a quantized linear once after loading, then apply it per call.

    prepared = prepare_linear(stored_tensors, scheme, out_features, in_features, act_dtype, device_type)
    y = apply_linear(x, prepared, bias)            # x [..., K] -> y [..., N]
    rows = gather_embedding(ids, prepared, dtype)  # quantized embedding table: ids [...] -> [..., K]

`prepare_linear` picks the kernel (`dispatch`): Triton on CUDA; on the CPU PyTorch's weight-only int8 /
int4 kernels where the scheme fits, the reference (dequantize, then matmul) otherwise. Engines keep
`prepared.tensors` as the layer's parameters (the stored tensors they replace can be freed).
`quantized_linear` runs directly on stored tensors (no repack): Triton on CUDA, the reference elsewhere.

A fused engine layer (q/k/v, gate/up) of a codebook scheme loads one table of levels per part, `codebook
[parts, 2**b]`, with `part_sizes` its parts' output widths: where the tables differ, `prepare_linear` returns
`PreparedParts` (the input is rotated once, then each part's columns run as their own linear).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import NanoqError
from ..format.hadamard import rotate_inputs
from ..format.layout import Sharding, param_specs
from ..format.schemes import Scheme
from . import cpu_grouped
from .base import LinearConfig
from .dispatch import KERNELS, select_kernel
from .reference_linear import ReferenceKernel
from .triton_linear import TritonKernel


@dataclass
class PreparedLinear:
    """A quantized weight repacked for one kernel (`kernel` names it in `dispatch.KERNELS`)."""

    kernel: str
    config: LinearConfig
    tensors: dict[str, torch.Tensor]


@dataclass
class PreparedParts:
    """A fused codebook layer whose parts keep their own tables of levels: the parts share the rotation
    (`signs [K]`, group size `group_size`), so `R x` is computed once and each part's columns are one
    `PreparedLinear` on it (`config.rotated_inputs`); their outputs are concatenated in order."""

    signs: torch.Tensor
    group_size: int
    parts: list[PreparedLinear]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the parts read, by a unique name (engines keep them as the layer's parameters)."""
        named = {"signs": self.signs}
        for index, part in enumerate(self.parts):
            named.update({f"part{index}_{name}": tensor for name, tensor in part.tensors.items()})
        return named


def prepare_linear(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    out_features: int,
    in_features: int,
    act_dtype: torch.dtype,
    device_type: str | None = None,
    is_embedding: bool = False,
    where: str = "layer",
    part_sizes: Sequence[int] | None = None,
) -> PreparedLinear | PreparedParts:
    """Choose the kernel for stored `tensors` (format.layout names) and repack them once for it.

    A codebook `[parts, 2**b]` (a fused engine layer, `part_sizes` its parts' output widths summing to
    `out_features`) gives one linear where all parts' tables are equal, else `PreparedParts`.
    """
    device_type = device_type or tensors["qweight"].device.type
    config = LinearConfig(scheme, out_features, in_features, act_dtype, device_type)
    specs = param_specs(scheme, out_features, in_features)
    table_names = [name for name, spec in specs.items() if spec.sharding is Sharding.PART_TABLE]
    per_part = [name for name in table_names if tensors[name].dim() == len(specs[name].shape) + 1]
    if per_part:
        parts = tensors[per_part[0]].shape[0]
        if part_sizes is None or len(part_sizes) != parts or sum(part_sizes) != out_features:
            raise NanoqError(f"{where}: {parts} tables of '{per_part[0]}' need the output widths of as many parts "
                             f"(got {part_sizes} for {out_features} outputs)")
        if all(bool((tensors[name] == tensors[name][:1]).all()) for name in per_part):
            return prepare_linear({**tensors, **{name: tensors[name][0] for name in per_part}}, scheme, out_features,
                                  in_features, act_dtype, device_type, is_embedding, where)
        return _prepare_parts(tensors, config, part_sizes, specs, where)
    kernel = select_kernel(config, needs_gather=is_embedding, where=where)
    return PreparedLinear(kernel.name, config, kernel.prepare(dict(tensors), config))


def _prepare_parts(tensors: Mapping[str, torch.Tensor], config: LinearConfig, part_sizes: Sequence[int],
                   specs: Mapping, where: str) -> PreparedParts:
    """Split a fused layer's stored tensors into its parts (columns `[.., N]`, one row of each part table),
    each part prepared as a linear on the inputs the kind's rotation made once."""
    rotation = config.scheme.kind.input_rotation(tensors, config.scheme)
    if rotation is None:
        raise NanoqError(f"{where}: parts with their own tables are supported for kinds that rotate their inputs")
    parts, start = [], 0
    for index, size in enumerate(part_sizes):
        part_config = replace(config, out_features=size, rotated_inputs=True)
        stored = {}
        for name, spec in specs.items():
            if spec.sharding in (Sharding.INPUT_OUTPUT, Sharding.OUTPUT):
                stored[name] = tensors[name][..., start:start + size].contiguous()
            elif spec.sharding is Sharding.PART_TABLE:
                stored[name] = tensors[name][index].contiguous()
        kernel = select_kernel(part_config, where=f"{where} (part {index})")
        parts.append(PreparedLinear(kernel.name, part_config, kernel.prepare(stored, part_config)))
        start += size
    return PreparedParts(*rotation, parts)


def apply_linear(x: torch.Tensor, prepared: PreparedLinear | PreparedParts,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [..., K]` -> `[..., N]` in x.dtype (+ bias)."""
    if isinstance(prepared, PreparedParts):
        rotated = rotate_inputs(x, prepared.signs, prepared.group_size)
        out = torch.cat([KERNELS[part.kernel].apply(rotated, part.tensors, part.config) for part in prepared.parts],
                        dim=-1)
    else:
        out = KERNELS[prepared.kernel].apply(x, prepared.tensors, prepared.config)
    return out if bias is None else out + bias.to(out.dtype)


def apply_grouped(x: torch.Tensor, counts: Sequence[int], prepared: Sequence[PreparedLinear | PreparedParts],
                  gather: torch.Tensor | None = None) -> torch.Tensor:
    """Several linears of equal output width on consecutive input rows (a MoE layer's experts): the input is
    `x [R, K]`, or its rows `gather [R]` (int64) when given, with `counts[i] > 0` rows for `prepared[i]` (summing to
    R) -> `[R, N]` in x.dtype, each row range exactly as `apply_linear` computes it. On the CPU, the weights whose
    kernel runs a single op for their row count (`cpu_grouped`; a kernel may choose its op by rows) are grouped by
    that op, and each group of at least as many weights as threads (and two) runs in one parallel region over its
    weights, gathering their rows there; the others one by one."""
    x = x.contiguous()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    single = [_row_op(p, x.dtype, count) for p, count in zip(prepared, counts)]
    by_op: dict[str, list[int]] = {}
    for i, op in enumerate(single):
        if op is not None:
            by_op.setdefault(op.op, []).append(i)
    groups = [group for group in by_op.values() if len(group) >= max(2, torch.get_num_threads())]
    if groups and cpu_grouped.load_extension():
        groups = []
    out = torch.empty(starts[-1], _out_features(prepared[0]), dtype=x.dtype, device=x.device)
    for group in groups:
        cpu_grouped.grouped_rows(out, x, [(starts[i], counts[i]) for i in group], [single[i] for i in group], gather)
    grouped = {i for group in groups for i in group}
    for i in range(len(prepared)):
        if i in grouped:
            continue
        rows = x[starts[i]:starts[i + 1]] if gather is None else x[gather[starts[i]:starts[i + 1]]]
        out[starts[i]:starts[i + 1]] = apply_linear(rows, prepared[i])
    return out


def _row_op(prepared: PreparedLinear | PreparedParts, dtype: torch.dtype, rows: int) -> cpu_grouped.RowOp | None:
    """The single op `prepared`'s kernel runs for `rows` rows of `dtype` (cpu_grouped), None where it has none."""
    if not isinstance(prepared, PreparedLinear) or prepared.config.device_type != "cpu":
        return None
    row_op = getattr(KERNELS[prepared.kernel], "row_op", None)
    return None if row_op is None else row_op(prepared.tensors, prepared.config, dtype, rows)


def _out_features(prepared: PreparedLinear | PreparedParts) -> int:
    if isinstance(prepared, PreparedParts):
        return sum(part.config.out_features for part in prepared.parts)
    return prepared.config.out_features


def gather_embedding(ids: torch.Tensor, prepared: PreparedLinear, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids [...]` of a quantized table prepared with `is_embedding=True` -> `[..., K]` in `dtype`."""
    return KERNELS[prepared.kernel].gather_rows(ids, prepared.tensors, prepared.config, dtype)


def _direct_kernel(device_type: str, config: LinearConfig):
    triton = TritonKernel()
    return triton if device_type == "cuda" and triton.can_implement(config)[0] else ReferenceKernel()


def quantized_linear(
    x: torch.Tensor, tensors: Mapping[str, torch.Tensor], scheme: Scheme, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One quantized linear on stored tensors (no repack): `x [..., K]` -> `[..., N]` (+ bias)."""
    qweight = tensors["qweight"]
    out_features = qweight.shape[1]
    config = LinearConfig(scheme, out_features, x.shape[-1], x.dtype, x.device.type)
    out = _direct_kernel(x.device.type, config).apply(x, dict(tensors), config)
    return out if bias is None else out + bias.to(out.dtype)


def quantized_embedding(
    ids: torch.Tensor, tensors: Mapping[str, torch.Tensor], scheme: Scheme, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids [...]` of a stored quantized table (N = vocab, K = embedding_dim) -> `[..., K]` in `dtype`."""
    qweight = tensors["qweight"]
    config = LinearConfig(scheme, qweight.shape[1], embedding_dim, dtype, qweight.device.type)
    return _direct_kernel(qweight.device.type, config).gather_rows(ids, dict(tensors), config, dtype)
