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
| FMT_CODEBOOK          | codebook (in side_ptr) | float32 | [2**b] | levels                                   |

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
def _unpack_words(words, BITS: tl.constexpr, K_LAST: tl.constexpr):
    """Codes of packed int32 words, each loaded once and unpacked in registers; code j of word w is input row
    w * (32 // BITS) + j. `words [W, BLOCK_N]` -> `[W * 32 // BITS, BLOCK_N]`, or with K_LAST
    `words [BLOCK_N, W]` -> `[BLOCK_N, W * 32 // BITS]` (a thread then holds consecutive rows of one column)."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    if K_LAST:
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (words.shape[0], words.shape[1] * PER_WORD))
    else:
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (words.shape[0] * PER_WORD, words.shape[1]))
    return codes


@triton.jit
def _rows_by_cols(rows, cols, K_LAST: tl.constexpr):
    """Offsets `rows[r] + cols[c]` as `[len(rows), len(cols)]`, or transposed `[len(cols), len(rows)]`."""
    if K_LAST:
        offsets = rows[None, :] + cols[:, None]
    else:
        offsets = rows[:, None] + cols[None, :]
    return offsets


@triton.jit
def _valid(rows_valid, cols_valid, K_LAST: tl.constexpr):
    """Mask `rows_valid[r] & cols_valid[c]`, laid out as `_rows_by_cols`."""
    if K_LAST:
        mask = rows_valid[None, :] & cols_valid[:, None]
    else:
        mask = rows_valid[:, None] & cols_valid[None, :]
    return mask


@triton.jit
def _load_codes(qweight_ptr, k0, offs_n, mask_n, K, stride_q, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                K_LAST: tl.constexpr):
    """Int32 codes `[BLOCK_K, BLOCK_N]` (`[BLOCK_N, BLOCK_K]` with K_LAST) of rows k0 .. k0 + BLOCK_K; 0 for
    rows >= K or masked columns."""
    if BITS == 3:  # per 32 rows: two words of 16 low 2-bit fields, then one word of 32 high bits
        BLOCKS: tl.constexpr = BLOCK_K // 32
        blocks = k0 // 32 + tl.arange(0, BLOCKS)
        low_rows = tl.reshape(blocks[:, None] * 3 + tl.arange(0, 2)[None, :], (BLOCKS * 2,))  # 3b, 3b + 1, ...
        low_valid = _valid((low_rows // 3) * 32 < K, mask_n, K_LAST)
        lows = tl.load(qweight_ptr + _rows_by_cols(low_rows * stride_q, offs_n, K_LAST), mask=low_valid, other=0)
        valid = _valid(blocks * 32 < K, mask_n, K_LAST)
        highs = tl.load(qweight_ptr + _rows_by_cols((blocks * 3 + 2) * stride_q, offs_n, K_LAST), mask=valid,
                        other=0)
        codes = _unpack_words(lows, 2, K_LAST) | (_unpack_words(highs, 1, K_LAST) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        word_rows = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        valid = _valid(word_rows * PER_WORD < K, mask_n, K_LAST)
        words = tl.load(qweight_ptr + _rows_by_cols(word_rows * stride_q, offs_n, K_LAST), mask=valid, other=0)
        codes = _unpack_words(words, BITS, K_LAST)
    return codes


@triton.jit
def _per_column(vector, K_LAST: tl.constexpr):
    """A `[BLOCK_N]` vector as the column factor of a tile: `[1, BLOCK_N]`, or `[BLOCK_N, 1]` with K_LAST."""
    if K_LAST:
        column = vector[:, None]
    else:
        column = vector[None, :]
    return column


@triton.jit
def _group_values(qweight_ptr, scales_ptr, side_ptr, k0, offs_n, mask_n, K, stride_q, stride_s,
                  IS_CODEBOOK: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  BLOCK_K: tl.constexpr, K_LAST: tl.constexpr):
    """Float32 `[BLOCK_K, BLOCK_N]` (`[BLOCK_N, BLOCK_K]` with K_LAST) of a grouped format: (code - zero) *
    scale, or level[code] * scale."""
    codes = _load_codes(qweight_ptr, k0, offs_n, mask_n, K, stride_q, BITS, BLOCK_K, K_LAST)
    if IS_CODEBOOK:
        values = tl.load(side_ptr + codes)  # codes < 2**b: every index is in the table
    else:
        values = codes.to(tl.float32)
    GROUPS: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP  # powers of two: BLOCK_K / GROUP, or 1
    if GROUPS == 1:
        # the tile lies in one group: its scales (and zeros) are one [BLOCK_N] vector, broadcast over the rows.
        # (Loaded as a [1, BLOCK_N] tile instead, they change the layout the compiler gives the whole tile:
        # the weight-first MMA operand then goes to shared memory 2 bytes per store instead of 16.)
        offsets = (k0 // GROUP) * stride_s + offs_n
        valid = mask_n & (k0 < K)
        scales = tl.load(scales_ptr + offsets, mask=valid, other=0).to(tl.float32)
        if IS_CODEBOOK:
            shifted = values
        elif HAS_ZEROS:
            shifted = values - _per_column(tl.load(side_ptr + offsets, mask=valid, other=0).to(tl.float32), K_LAST)
        else:
            shifted = values - (1 << (BITS - 1))
        out = shifted * _per_column(scales, K_LAST)
    else:
        group_rows = k0 // GROUP + tl.arange(0, GROUPS)
        valid = _valid(group_rows * GROUP < K, mask_n, K_LAST)  # [GROUPS, BLOCK_N] or [BLOCK_N, GROUPS]
        group_offsets = _rows_by_cols(group_rows * stride_s, offs_n, K_LAST)
        scales = tl.load(scales_ptr + group_offsets, mask=valid, other=0).to(tl.float32)
        if IS_CODEBOOK:
            zeros = tl.zeros_like(scales)
        elif HAS_ZEROS:
            zeros = tl.load(side_ptr + group_offsets, mask=valid, other=0).to(tl.float32)
        else:
            zeros = tl.zeros_like(scales) + (1 << (BITS - 1))
        if K_LAST:
            grouped = tl.reshape(values, (values.shape[0], GROUPS, BLOCK_K // GROUPS))
            out = tl.reshape((grouped - zeros[:, :, None]) * scales[:, :, None], (values.shape[0], BLOCK_K))
        else:
            grouped = tl.reshape(values, (GROUPS, BLOCK_K // GROUPS, values.shape[1]))
            out = tl.reshape((grouped - zeros[:, None, :]) * scales[:, None, :], (BLOCK_K, values.shape[1]))
    return out


@triton.jit
def load_weight_tile(
    qweight_ptr,  # see the layout table
    scales_ptr,  # float16 [K/G, N] (int_group); unused for int8 per channel
    side_ptr,  # uint8 [K/G, N] (asymmetric int_group); float32 [2**b] levels (codebook); unused otherwise
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
    K_LAST: tl.constexpr = False,
):
    """Float32 `[BLOCK_K, BLOCK_N]`, or its transpose `[BLOCK_N, BLOCK_K]` built with K as the fast axis when
    K_LAST: dequantized weights (int_group, codebook) or raw codes (int8 per channel); 0 in rows >= K and
    masked columns. Packed words are loaded once each and unpacked in registers; scales (and zeros) once
    per group row (BLOCK_K and GROUP are powers of two, so a tile holds whole groups or lies inside one).
    Written with if/else only: the compiler, unlike the interpreter, also builds the statements after a
    constexpr branch that returned."""
    if FMT == JIT_FMT_INT8_CHANNEL:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(qweight_ptr + _rows_by_cols(offs_k * stride_q, offs_n, K_LAST),
                        mask=_valid(offs_k < K, mask_n, K_LAST), other=0)
        tile = codes.to(tl.float32)
    else:
        tile = _group_values(qweight_ptr, scales_ptr, side_ptr, k0, offs_n, mask_n, K, stride_q, stride_s,
                             FMT == JIT_FMT_CODEBOOK, BITS, GROUP, HAS_ZEROS, BLOCK_K, K_LAST)
    return tile
