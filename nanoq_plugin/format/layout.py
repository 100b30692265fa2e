"""Names, shapes and dtypes of the tensors that a quantized linear `P` stores as `P.<name>`: each scheme kind
says (format.kinds; docs/FORMAT.md has the table). For a linear with weight `[N, K]` (N = out features,
K = in features), G = group size, b = bits:

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

from .schemes import Scheme
from .tensor_spec import NVFP4_SCALE_DTYPE, SCALE_DTYPE, ZERO_DTYPE, Sharding, TensorSpec, stored_bytes

__all__ = ["NVFP4_SCALE_DTYPE", "SCALE_DTYPE", "ZERO_DTYPE", "Sharding", "TensorSpec", "check_shape_fits",
           "param_specs", "stored_bytes"]


def check_shape_fits(scheme: Scheme, out_features: int, in_features: int, where: str) -> None:
    """Raise NanoqError unless a `[out_features, in_features]` weight can be stored with `scheme`."""
    scheme.kind.check_shape_fits(scheme, out_features, in_features, where)


def param_specs(scheme: Scheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
    """The tensors (name -> spec) stored for one linear of shape `[out_features, in_features]`."""
    return scheme.kind.param_specs(scheme, out_features, in_features)
