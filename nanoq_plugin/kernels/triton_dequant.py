"""The one Triton dequantizer: a `[BLOCK_K, BLOCK_N]` tile of a stored weight, as float32 codes × scales.

Every Triton kernel (split-K / tiled GEMM, embedding gather) calls `load_weight_tile` inside its loop; a
new format is one more constexpr branch here, not a copy of a GEMM.

Stored layout read here (docs/FORMAT.md; K = input features, N = output features, G = group size):

| format (FMT)          | tensor  | dtype   | shape            | element (k, n)                                   |
|-----------------------|---------|---------|------------------|--------------------------------------------------|
| FMT_INT_GROUP, b=1,2,4,8 | qweight | int32 | [K*b/32, N]      | bits [(k % (32/b))*b, +b) of word [k // (32/b), n] |
| FMT_INT_GROUP, b=3    | qweight | int32   | [3K/32, N]       | low 2 bits: word [3(k//32) + (k%32)//16, n] at 2(k%16); bit 2: word [3(k//32)+2, n] at k%32 |
| FMT_INT_GROUP         | scales  | float16 | [K/G, N]         | w = (code - zero) * scale                        |
| FMT_INT_GROUP asym    | zeros   | uint8   | [K/G, N]         | zero (symmetric: 2**(b-1))                       |
| FMT_INT8_CHANNEL      | qweight | int8    | [K, N]           | w = code * scales[n] (scale applied by the caller)|
| FMT_CODEBOOK          | qweight, scales | as FMT_INT_GROUP | | w = codebook[code] * scale (the rotated weight) |
| FMT_CODEBOOK          | codebook (in zeros_ptr) | float32 | [2**b] | levels                                   |

`offs_n` may be any vector of column indices (the embedding kernel passes token ids).
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_INT_GROUP = 0
FMT_INT8_CHANNEL = 1
FMT_CODEBOOK = 2
# The same values as the only kind of global a compiled @triton.jit function may read (the interpreter reads
# plain ints too, which is how this once slipped through the CPU tests).
JIT_FMT_INT8_CHANNEL = tl.constexpr(FMT_INT8_CHANNEL)
JIT_FMT_CODEBOOK = tl.constexpr(FMT_CODEBOOK)


@triton.jit
def load_weight_tile(
    qweight_ptr,  # see the layout table
    scales_ptr,  # float16 [K/G, N] (int_group); unused for int8 per channel
    zeros_ptr,  # uint8 [K/G, N] (asymmetric int_group); float32 [2**b] levels (codebook); unused otherwise
    offs_k,  # int32 [BLOCK_K] input rows of the tile
    offs_n,  # int32 [BLOCK_N] output columns of the tile
    mask,  # bool [BLOCK_K, BLOCK_N] elements that exist
    stride_q,  # elements between qweight rows
    stride_s,  # elements between scales / zeros rows
    FMT: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
):
    """Float32 `[BLOCK_K, BLOCK_N]`: dequantized weights (int_group) or raw codes (int8 per channel); 0 where masked."""
    cols = offs_n[None, :]
    if FMT == JIT_FMT_INT8_CHANNEL:
        codes = tl.load(qweight_ptr + offs_k[:, None] * stride_q + cols, mask=mask, other=0)
        return codes.to(tl.float32)
    if BITS == 3:
        block = offs_k // 32
        lane = offs_k % 32
        low_row = block * 3 + lane // 16
        low = tl.load(qweight_ptr + low_row[:, None] * stride_q + cols, mask=mask, other=0)
        high = tl.load(qweight_ptr + (block * 3 + 2)[:, None] * stride_q + cols, mask=mask, other=0)
        codes = ((low >> ((lane % 16) * 2)[:, None]) & 3) | (((high >> lane[:, None]) & 1) << 2)
    else:
        per_word: tl.constexpr = 32 // BITS
        words = tl.load(qweight_ptr + (offs_k // per_word)[:, None] * stride_q + cols, mask=mask, other=0)
        codes = (words >> ((offs_k % per_word) * BITS)[:, None]) & ((1 << BITS) - 1)
    group_rows = (offs_k // GROUP)[:, None] * stride_s + cols
    scales = tl.load(scales_ptr + group_rows, mask=mask, other=0).to(tl.float32)
    if FMT == JIT_FMT_CODEBOOK:
        return tl.load(zeros_ptr + codes, mask=mask, other=0.0) * scales
    if HAS_ZEROS:
        zeros = tl.load(zeros_ptr + group_rows, mask=mask, other=0).to(tl.float32)
    else:
        zeros = (1 << (BITS - 1)) * 1.0
    return (codes.to(tl.float32) - zeros) * scales
