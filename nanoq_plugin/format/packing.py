"""Bit packing of integer codes into int32 words along the input dimension.

Layout (the spec, see docs/FORMAT.md): codes `[K, N]` (K = input features, N = output features,
values in `[0, 2**bits)`) are packed along K into int32 `[K * bits // 32, N]`. K must be a multiple of 32.

- bits in {1, 2, 4, 8}: word row `r` holds code rows `r*p .. r*p + p - 1` with `p = 32 // bits`;
  code row `r*p + j` sits in bits `[j*bits, (j+1)*bits)` of the word (little end first).
- bits == 3: every block of 32 code rows becomes 3 word rows: rows `3b` and `3b+1` hold the low two bits
  of code rows `32b .. 32b+15` and `32b+16 .. 32b+31` (the 2-bit layout), row `3b+2` holds bit 2 of code
  rows `32b .. 32b+31` (the 1-bit layout).

Every 32 input rows map to exactly `bits` word rows, so a slice of K on a multiple of 32 is a plain slice
of the packed rows (tensor-parallel sharding along the input dim); a slice of N is a slice of columns.
"""

from __future__ import annotations

import torch

from ..errors import NanoqError
from .tensor_spec import row_steps

PACK_BLOCK = 32  # input rows per packing block; every K must be a multiple of it


def packed_rows(in_features: int, bits: int) -> int:
    """Number of int32 word rows that hold `in_features` codes of `bits` bits."""
    if in_features % PACK_BLOCK:
        raise NanoqError(f"input features ({in_features}) must be a multiple of {PACK_BLOCK} to pack {bits}-bit codes")
    return in_features * bits // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_uniform(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    k, n = codes.shape
    shifts = (torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits).view(1, per_word, 1)
    grouped = codes.to(torch.int64).view(k // per_word, per_word, n)
    return _to_int32((grouped << shifts).sum(dim=1))


def _unpack_uniform(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # int32 arithmetic: a right shift of a negative word fills with sign bits, which the mask drops.
    per_word = 32 // bits
    rows, n = packed.shape
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per_word, 1)
    return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).view(rows * per_word, n).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes uint8/int `[K, N]` with values in `[0, 2**bits)` into int32 `[K*bits//32, N]`, a few packing
    blocks at a time (`row_steps`: each block of 32 code rows is its own `bits` word rows)."""
    if codes.dim() != 2:
        raise NanoqError(f"codes must be 2-D [K, N], got shape {tuple(codes.shape)}")
    k, n = codes.shape
    packed_rows(k, bits)
    if bits not in (1, 2, 3, 4, 8):
        raise NanoqError(f"cannot pack {bits}-bit codes (supported: 1, 2, 3, 4, 8)")
    out = torch.empty((k * bits // 32, n), dtype=torch.int32, device=codes.device)
    for start, end in row_steps(k, n, PACK_BLOCK):
        out[start * bits // 32:end * bits // 32] = _pack_blocks(codes[start:end], bits)
    return out


def _pack_blocks(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` of whole packing blocks `codes [32 b, N]`."""
    if bits != 3:
        return _pack_uniform(codes, bits)
    blocks, n = codes.shape[0] // PACK_BLOCK, codes.shape[1]
    codes = codes.to(torch.int64)
    low = _pack_uniform(codes & 3, 2).view(blocks, 2, n)
    high = _pack_uniform(codes >> 2, 1).view(blocks, 1, n)
    return torch.cat([low, high], dim=1).view(blocks * 3, n)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 `[K*bits//32, N]` -> uint8 `[K, N]`, a few packing blocks at a time."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise NanoqError(f"packed codes must be int32 [rows, N], got {packed.dtype} {tuple(packed.shape)}")
    rows, n = packed.shape
    if bits not in (1, 2, 3, 4, 8):
        raise NanoqError(f"cannot unpack {bits}-bit codes (supported: 1, 2, 3, 4, 8)")
    if bits == 3 and rows % 3:
        raise NanoqError(f"3-bit packed rows ({rows}) must be a multiple of 3")
    k = rows * 32 // bits
    out = torch.empty((k, n), dtype=torch.uint8, device=packed.device)
    for start, end in row_steps(k, n, PACK_BLOCK):
        out[start:end] = _unpack_blocks(packed[start * bits // 32:end * bits // 32], bits)
    return out


def _unpack_blocks(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`unpack_codes` of whole packing blocks `packed [bits b, N]`."""
    if bits != 3:
        return _unpack_uniform(packed, bits)
    blocks, n = packed.shape[0] // 3, packed.shape[1]
    grouped = packed.view(blocks, 3, n)
    low = _unpack_uniform(grouped[:, :2].reshape(blocks * 2, n), 2).view(blocks, PACK_BLOCK, n)
    high = _unpack_uniform(grouped[:, 2].contiguous(), 1).view(blocks, PACK_BLOCK, n)
    return (low | (high << 2)).view(blocks * PACK_BLOCK, n)
