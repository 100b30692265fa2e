"""Schemes every kernel is tested on, and a helper that makes stored tensors and their reference weight."""

import os

import torch

from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.rtn import quantize_rtn

# where the Triton tests run: "cpu" (the interpreter, as CI runs them) or "cuda" (compiled, on a GPU machine)
TRITON_DEVICE = os.environ.get("NANOQ_TRITON_DEVICE", "cpu")

SCHEMES = [
    "int8", "int8g128", "int8g32-asym",
    "int4g128", "int4g64-asym", "int4g32",
    "int3g128", "int3g64-asym", "int3g32",
    "int2g64", "int2g32-asym", "int2g128",
]


def stored_and_reference(name: str, out_features: int, in_features: int, seed: int, device: str = "cpu"):
    """(scheme, stored tensors on `device`, reference float32 weight [N, K] on `device`) for a random weight."""
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    weight = torch.randn(out_features, in_features, generator=generator)
    tensors = quantize_rtn(weight, scheme)
    reference = dequantize(tensors, scheme, out_features, in_features)
    return scheme, {key: t.to(device) for key, t in tensors.items()}, reference.to(device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32."""
    return (torch.linalg.norm(out.float() - ref.float()) / torch.linalg.norm(ref.float())).item()


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
