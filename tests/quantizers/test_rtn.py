import pytest
import torch

from nanoq_plugin.format.reference import dequantize

from nanoq_plugin.format.schemes import INT8_CHANNEL, parse_scheme
from nanoq_plugin.quantizers.rtn import fake_quantize_rtn, quantize_rtn, rtn_scales


def test_symmetric_scale_is_group_absmax_over_half_range():
    weight = torch.tensor([[1.0, -3.0] + [0.0] * 30, [0.5] * 32])
    scales, zeros = rtn_scales(weight, parse_scheme("int4g32"))
    assert zeros is None and scales.shape == (1, 2)
    assert torch.allclose(scales[:, 0], torch.tensor([3.0 / 7.5]), rtol=1e-3) and torch.allclose(scales[:, 1], torch.tensor([0.5 / 7.5]), rtol=1e-3)


def test_asymmetric_range_includes_zero():
    weight = torch.full((1, 32), 2.0)
    weight[0, 0] = 5.0
    scales, zeros = rtn_scales(weight, parse_scheme("int2g32-asym"))
    assert torch.allclose(scales, torch.tensor([[5.0 / 3]]), rtol=1e-3) and zeros.item() == 0
    scales, zeros = rtn_scales(-weight, parse_scheme("int2g32-asym"))
    assert zeros.item() == 3


def test_int8_channel_scale():
    weight = torch.tensor([[254.0, -1.0], [0.0, 0.0]])
    scales, _ = rtn_scales(weight, INT8_CHANNEL)
    assert scales[0].item() == 2.0 and scales[1].item() > 0


@pytest.mark.parametrize("name, ratio", [("int4g32", 0.97), ("int3g64-asym", 0.97), ("int2g32", 0.97), ("int8", 1.0)])
def test_clip_search_never_raises_the_group_error_and_lowers_it_with_outliers(name, ratio):
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    weight[:, ::37] *= 8  # a few outliers per group
    plain = dequantize(quantize_rtn(weight, scheme), scheme, 64, 128)
    clipped = dequantize(quantize_rtn(weight, scheme, clip_search=True), scheme, 64, 128)
    plain_error = (plain - weight).abs().pow(2.4).sum()
    clipped_error = (clipped - weight).abs().pow(2.4).sum()
    assert clipped_error <= ratio * plain_error  # int8: 127 levels leave little to gain


@pytest.mark.parametrize("name", ["int4g32", "int3g64-asym", "int8"])
def test_fake_quantize_equals_the_stored_round_trip(name):
    scheme = parse_scheme(name)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    expected = dequantize(quantize_rtn(weight, scheme), scheme, 48, 128)
    assert torch.equal(fake_quantize_rtn(weight, scheme), expected)
