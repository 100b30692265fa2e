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
def _unpack_words(words, BITS: tl.constexpr):
    """Codes of packed int32 `words [W, BLOCK_N]` -> `[W * 32 // BITS, BLOCK_N]` int32, code j of word w at
    row w * (32 // BITS) + j: each word is loaded once and unpacked in registers."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (words.shape[0] * PER_WORD, words.shape[1]))


@triton.jit
def _load_codes(qweight_ptr, k0, offs_n, mask_n, K, stride_q, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Int32 codes `[BLOCK_K, BLOCK_N]` of rows k0 .. k0 + BLOCK_K (0 for rows >= K or masked columns)."""
    cols = offs_n[None, :]
    if BITS == 3:  # per 32 rows: two words of 16 low 2-bit fields, then one word of 32 high bits
        BLOCKS: tl.constexpr = BLOCK_K // 32
        blocks = k0 // 32 + tl.arange(0, BLOCKS)
        valid = ((blocks * 32) < K)[:, None] & mask_n[None, :]  # [BLOCKS, BLOCK_N]
        low_rows = blocks[:, None] * 3 + tl.arange(0, 2)[None, :]  # [BLOCKS, 2]
        lows = tl.load(qweight_ptr + low_rows[:, :, None] * stride_q + cols[None, :, :], mask=valid[:, None, :],
                       other=0)  # [BLOCKS, 2, BLOCK_N]
        low_codes = _unpack_words(tl.reshape(lows, (BLOCKS * 2, lows.shape[2])), 2)
        highs = tl.load(qweight_ptr + (blocks * 3 + 2)[:, None] * stride_q + cols, mask=valid, other=0)
        codes = low_codes | (_unpack_words(highs, 1) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        word_rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        valid = ((word_rows * PER_WORD) < K)[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + word_rows[:, None] * stride_q + cols, mask=valid, other=0)
        codes = _unpack_words(words, BITS)
    return codes


@triton.jit
def _group_values(qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, mask_n, K, stride_q, stride_s,
                  IS_CODEBOOK: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Float32 `[BLOCK_K, BLOCK_N]` of a grouped format: (code - zero) * scale, or level[code] * scale."""
    cols = offs_n[None, :]
    codes = _load_codes(qweight_ptr, k0, offs_n, mask_n, K, stride_q, BITS, BLOCK_K)
    GROUPS: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP  # powers of two: BLOCK_K / GROUP, or 1
    group_rows = k0 // GROUP + tl.arange(0, GROUPS)
    valid = ((group_rows * GROUP) < K)[:, None] & mask_n[None, :]  # [GROUPS, BLOCK_N]
    scales = tl.load(scales_ptr + group_rows[:, None] * stride_s + cols, mask=valid, other=0).to(tl.float32)
    if IS_CODEBOOK:
        values = tl.load(zeros_ptr + codes)  # codes < 2**b: every index is in the table
        zeros = tl.zeros_like(scales)
    else:
        values = codes.to(tl.float32)
        if HAS_ZEROS:
            zeros = tl.load(zeros_ptr + group_rows[:, None] * stride_s + cols, mask=valid, other=0).to(tl.float32)
        else:
            zeros = tl.zeros_like(scales) + (1 << (BITS - 1))
    if GROUPS == 1:
        out = (values - zeros) * scales
    else:
        grouped = tl.reshape(values, (GROUPS, BLOCK_K // GROUPS, values.shape[1]))
        out = tl.reshape((grouped - zeros[:, None, :]) * scales[:, None, :], (BLOCK_K, values.shape[1]))
    return out


@triton.jit
def load_weight_tile(
    qweight_ptr,  # see the layout table
    scales_ptr,  # float16 [K/G, N] (int_group); unused for int8 per channel
    zeros_ptr,  # uint8 [K/G, N] (asymmetric int_group); float32 [2**b] levels (codebook); unused otherwise
    k0,  # first input row of the tile, a multiple of BLOCK_K
    offs_n,  # int32 [BLOCK_N] output columns of the tile (any column indices: token ids for embeddings)
    mask_n,  # bool [BLOCK_N] columns that exist
    K,  # input rows of the weight (rows >= K read as 0)
    stride_q,  # elements between qweight rows
    stride_s,  # elements between scales / zeros rows
    FMT: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Float32 `[BLOCK_K, BLOCK_N]`: dequantized weights (int_group, codebook) or raw codes (int8 per channel);
    0 in rows >= K and masked columns. Packed words are loaded once each and unpacked in registers; scales
    (and zeros) once per group row (BLOCK_K and GROUP are powers of two, so a tile holds whole groups or
    lies inside one). Written with if/else only: the compiler, unlike the interpreter, also builds the
    statements after a constexpr branch that returned."""
    if FMT == JIT_FMT_INT8_CHANNEL:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(qweight_ptr + offs_k[:, None] * stride_q + offs_n[None, :],
                        mask=(offs_k < K)[:, None] & mask_n[None, :], other=0)
        tile = codes.to(tl.float32)
    else:
        tile = _group_values(qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, mask_n, K, stride_q, stride_s,
                             FMT == JIT_FMT_CODEBOOK, BITS, GROUP, HAS_ZEROS, BLOCK_K)
    return tile
