"""Packing against a plain bit-by-bit oracle written here, golden words, and the TP slicing property."""

import pytest
import torch

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.packing import pack_codes, unpack_codes


def oracle_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packing straight from the layout text in docs/FORMAT.md."""
    k, n = codes.shape
    words = []
    for block in range(k // 32):
        rows = codes[block * 32:(block + 1) * 32].tolist()
        if bits == 3:
            planes = [(0, 16, 2, 0), (16, 32, 2, 0), (0, 32, 1, 2)]  # (first row, end row, width, shift)
        else:
            per = 32 // bits
            planes = [(w * per, (w + 1) * per, bits, 0) for w in range(bits)]
        for first, end, width, shift in planes:
            word_row = []
            for col in range(n):
                word = 0
                for j, row in enumerate(range(first, end)):
                    word |= ((rows[row][col] >> shift) & ((1 << width) - 1)) << (j * width)
                word_row.append(word - (1 << 32) if word >= 1 << 31 else word)
            words.append(word_row)
    return torch.tensor(words, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bitwise_oracle(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 5), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, bits), oracle_pack(codes, bits))


def test_golden_words():
    codes4 = torch.arange(32, dtype=torch.uint8).remainder(16).view(32, 1)
    assert pack_codes(codes4, 4)[:, 0].tolist() == [0x76543210, 0xFEDCBA98 - 2**32] * 2
    codes3 = torch.full((32, 1), 7, dtype=torch.uint8)
    assert pack_codes(codes3, 3)[:, 0].tolist() == [-1, -1, -1]
    codes3[0, 0] = 4  # only the high bit of row 0
    assert pack_codes(codes3, 3)[:, 0].tolist() == [-4, -1, -1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 1), (128, 33), (576, 7), (1536, 3)])
def test_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] * bits // 32, shape[1])
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_slices_of_packed_rows_are_packed_slices(bits):
    codes = torch.randint(0, 2**bits, (256, 12), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    # input-dim shard on a multiple of 32 rows, and an output-dim shard
    assert torch.equal(packed[2 * bits:6 * bits], pack_codes(codes[64:192], bits))
    assert torch.equal(packed[:, 4:9], pack_codes(codes[:, 4:9].contiguous(), bits))


def test_rejects_k_not_multiple_of_32():
    with pytest.raises(NanoqError, match=r"input features \(48\) must be a multiple of 32"):
        pack_codes(torch.zeros(48, 2, dtype=torch.uint8), 4)
