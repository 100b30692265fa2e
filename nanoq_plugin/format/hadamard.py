"""The randomized Hadamard rotation of codebook schemes, applied per group of G input channels.

For a group size G (a power of two), `H` is the Sylvester Hadamard matrix (entries ±1, `H Hᵀ = G I`) and
`D` the diagonal of the stored ±1 `signs` of the group. The rotation of a group of inputs is
`R = H D / sqrt(G)` (orthogonal), so for a weight `W [N, K]`:

    rotated weight   W' = W Rᵀ       (per group: W'_g = W_g D H / sqrt(G))
    rotated input    x' = R x        (per group: x'_g = H (D x_g) / sqrt(G))
    and              W x = W' x'

A block-diagonal rotation keeps every group of G inputs on its own, so a tensor-parallel split of K at a
multiple of G splits the rotation too.
"""

from __future__ import annotations

import functools

import torch

from ..errors import NanoqError


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(size: int) -> torch.Tensor:
    if size < 1 or size & (size - 1):
        raise NanoqError(f"a Hadamard rotation needs a power-of-two size, got {size}")
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Sylvester Hadamard matrix `[size, size]` (±1 entries, symmetric), cached per device: every forward
    of a codebook layer reads it, and a host-to-GPU copy per call would synchronize (and cannot be captured
    in a CUDA graph). Callers must not modify it in place."""
    return _hadamard_on(size, torch.device(device), dtype)


@functools.lru_cache(maxsize=None)
def _hadamard_on(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _hadamard_cpu(size).to(device=device, dtype=dtype)


def random_signs(in_features: int, seed: int) -> torch.Tensor:
    """±1 int8 `[in_features]` from `seed` (the same for every module with the same K and seed, so that
    modules reading one input, like q/k/v, rotate it alike)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + in_features)
    return (torch.randint(0, 2, (in_features,), generator=generator, dtype=torch.int8) * 2 - 1)


def rotate_inputs(x: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """`x [..., K]` -> `R x` `[..., K]` in x's dtype (computed in float32)."""
    shape = x.shape
    grouped = (x.to(torch.float32) * signs.to(device=x.device, dtype=torch.float32)).reshape(-1, group_size)
    rotated = grouped @ hadamard(group_size, x.device) * group_size**-0.5  # H symmetric: (H v)ᵀ = vᵀ H
    return rotated.reshape(shape).to(x.dtype)


def rotate_weight(weight: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """`W [N, K]` -> `W' = W Rᵀ` `[N, K]` float32 (each row is rotated like an input)."""
    return rotate_inputs(weight.to(torch.float32), signs, group_size)


def unrotate_weight(rotated: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """`W' [N, K]` -> `W = W' R` `[N, K]` float32 (inverse of `rotate_weight`)."""
    n, k = rotated.shape
    grouped = rotated.to(torch.float32).reshape(-1, group_size) @ hadamard(group_size, rotated.device)
    return grouped.reshape(n, k) * group_size**-0.5 * signs.to(device=rotated.device, dtype=torch.float32)


def rotate_hessian(hessian: torch.Tensor, signs: torch.Tensor, group_size: int) -> torch.Tensor:
    """`H [K, K]` of inputs x -> `R H Rᵀ`, the Hessian of the rotated inputs x' = R x."""
    half = rotate_inputs(hessian, signs, group_size)  # rows: H Rᵀ (each row rotated)
    return rotate_inputs(half.t().contiguous(), signs, group_size).t()
