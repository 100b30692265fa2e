"""The quantized-embedding gather kernel against the reference `gather_rows` (interpreter, or a GPU: TRITON_DEVICE)."""

import pytest
import torch

pytest.importorskip("triton")

from nanoq_plugin.format.reference import gather_rows  # noqa: E402
from nanoq_plugin.kernels.custom_ops import triton_weight_format  # noqa: E402
from nanoq_plugin.kernels.triton_embedding import embedding_gather  # noqa: E402

from schemes_under_test import SCHEMES, TRITON_DEVICE, stored_and_reference  # noqa: E402


@pytest.mark.parametrize("name", SCHEMES)
def test_gather_matches_reference_rows(name):
    vocab, hidden = 203, 384 if "g128" in name else 192
    scheme, tensors, weight = stored_and_reference(name, vocab, hidden, 11, TRITON_DEVICE)
    ids = torch.tensor([[0, 202, 5, 5], [17, 1, 200, 3]], device=TRITON_DEVICE)
    fmt, side = triton_weight_format(scheme, tensors)
    out = embedding_gather(ids, tensors["qweight"], tensors["scales"], side, fmt, hidden,
                           torch.float32, block_t=4, block_h=64)
    assert out.shape == (2, 4, hidden)
    ref = gather_rows(tensors, scheme, ids, hidden).view(2, 4, hidden)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(ref, weight[ids], rtol=0, atol=0)
