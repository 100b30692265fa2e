"""Schemes every kernel is tested on, and a helper that makes stored tensors and their reference weight."""

import torch

from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.rtn import quantize_rtn

SCHEMES = [
    "int8", "int8g128", "int8g32-asym",
    "int4g128", "int4g64-asym", "int4g32",
    "int3g128", "int3g64-asym", "int3g32",
    "int2g64", "int2g32-asym", "int2g128",
]


def stored_and_reference(name: str, out_features: int, in_features: int, seed: int):
    """(scheme, stored tensors, reference float32 weight [N, K]) for a random weight."""
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    weight = torch.randn(out_features, in_features, generator=generator)
    tensors = quantize_rtn(weight, scheme)
    return scheme, tensors, dequantize(tensors, scheme, out_features, in_features)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32."""
    return (torch.linalg.norm(out.float() - ref.float()) / torch.linalg.norm(ref.float())).item()


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
