"""FP4 E2M1 codes (the value format of NVFP4): 1 sign bit (bit 3) and 3 bits indexing the magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6; two codes per byte, the even input index in the low nibble (as compressed-tensors
and the NVIDIA kernels store them)."""

from __future__ import annotations

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
# midpoints between consecutive magnitudes: a magnitude rounds to the number of midpoints it reaches
# (ties go up, as in compressed-tensors' threshold counting)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale, |v| beyond 6 saturates) to E2M1 codes, uint8."""
    midpoints = torch.tensor(_MIDPOINTS, dtype=values.dtype, device=values.device)
    index = torch.bucketize(values.abs().contiguous(), midpoints, right=True).to(torch.uint8)  # midpoints <= |v|
    return index | (torch.signbit(values).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits) -> float32 values."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    magnitude = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack codes uint8 (even size along `dim`) two per byte along `dim`: element 2i low, 2i+1 high nibble."""
    low, high = codes.narrow(dim, 0, codes.shape[dim]).unflatten(dim, (-1, 2)).unbind(dim + 1)
    return (low | (high << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `pack_fp4`: bytes -> codes uint8, twice as long along `dim`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=dim + 1).flatten(dim, dim + 1)
