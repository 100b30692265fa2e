"""Names, shapes and dtypes of the tensors that a quantized linear `P` stores as `P.<name>`.

For a linear with weight `[N, K]` (N = out features, K = in features), G = group size, b = bits:

| scheme     | tensor   | dtype   | shape              | sharding: output dim / input dim |
|------------|----------|---------|--------------------|----------------------------------|
| int_group  | qweight  | int32   | [K * b / 32, N]    | dim 1 / dim 0 (32-row blocks)    |
| int_group  | scales   | float16 | [K / G, N]         | dim 1 / dim 0                    |
| int_group  | zeros    | uint8   | [K / G, N]         | dim 1 / dim 0 (asymmetric only)  |
| int8       | qweight  | int8    | [K, N]             | dim 1 / dim 0                    |
| int8       | scales   | float16 | [N]                | dim 0 / replicated               |
| nvfp4      | qweight  | uint8   | [K / 2, N]         | dim 1 / dim 0 (2 codes per byte) |
| nvfp4      | scales   | float8_e4m3fn | [K / 16, N]  | dim 1 / dim 0                    |
| nvfp4      | global_scale | float32 | [1]            | replicated (shared by fused parts) |
| codebook   | qweight  | int32   | [K * b / 32, N]    | dim 1 / dim 0 (as int_group)     |
| codebook   | scales   | float16 | [K / G, N]         | dim 1 / dim 0                    |
| codebook   | codebook | float32 | [2 ** b]           | replicated                       |
| codebook   | signs    | int8    | [K]                | replicated / dim 0               |

A float module keeps its ordinary `P.weight` in the stored dtype. A bias is always `P.bias` in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NanoqError
from .packing import PACK_BLOCK, packed_rows
from .schemes import Scheme, SchemeKind

SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.uint8
NVFP4_SCALE_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


def check_shape_fits(scheme: Scheme, out_features: int, in_features: int, where: str) -> None:
    """Raise NanoqError unless a `[out_features, in_features]` weight can be stored with `scheme`."""
    if scheme.kind in (SchemeKind.INT_GROUP, SchemeKind.CODEBOOK):
        if in_features % scheme.group_size:
            fits = [g for g in (128, 64, 32) if in_features % g == 0]
            hint = f"choose group size {' or '.join(map(str, fits))}" if fits else "keep it in float"
            raise NanoqError(
                f"{where}: group size {scheme.group_size} does not divide input dim {in_features} ({hint})"
            )
        if in_features % PACK_BLOCK:
            raise NanoqError(f"{where}: input dim {in_features} must be a multiple of {PACK_BLOCK} to pack codes")
    if scheme.kind is SchemeKind.NVFP4 and in_features % scheme.group_size:
        raise NanoqError(f"{where}: nvfp4 needs an input dim that is a multiple of 16, got {in_features}")


def param_specs(scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """The tensors (name -> spec) stored for one linear of shape `[out_features, in_features]`."""
    n, k = out_features, in_features
    if scheme.kind is SchemeKind.FLOAT:
        return {}
    if scheme.kind is SchemeKind.INT8_CHANNEL:
        return {"qweight": TensorSpec((k, n), torch.int8), "scales": TensorSpec((n,), SCALE_DTYPE)}
    check_shape_fits(scheme, n, k, "linear")
    groups = k // scheme.group_size
    if scheme.kind is SchemeKind.NVFP4:
        return {"qweight": TensorSpec((k // 2, n), torch.uint8), "scales": TensorSpec((groups, n), NVFP4_SCALE_DTYPE),
                "global_scale": TensorSpec((1,), torch.float32)}
    specs = {
        "qweight": TensorSpec((packed_rows(k, scheme.bits), n), torch.int32),
        "scales": TensorSpec((groups, n), SCALE_DTYPE),
    }
    if scheme.kind is SchemeKind.CODEBOOK:
        specs["codebook"] = TensorSpec((1 << scheme.bits,), torch.float32)
        specs["signs"] = TensorSpec((k,), torch.int8)
    elif not scheme.symmetric:
        specs["zeros"] = TensorSpec((groups, n), ZERO_DTYPE)
    return specs


def stored_bytes(specs: dict[str, TensorSpec]) -> int:
    """Bytes the tensors of `specs` take on disk (safetensors data, headers not counted)."""
    total = 0
    for spec in specs.values():
        count = 1
        for dim in spec.shape:
            count *= dim
        total += count * spec.dtype.itemsize
    return total
