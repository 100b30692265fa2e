import torch

from nanoq_plugin.format.schemes import INT8_CHANNEL, parse_scheme
from nanoq_plugin.quantizers.rtn import rtn_scales


def test_symmetric_scale_is_group_absmax_over_half_range():
    weight = torch.tensor([[1.0, -3.0] + [0.0] * 30, [0.5] * 32])
    scales, zeros = rtn_scales(weight, parse_scheme("int4g32"))
    assert zeros is None and scales.shape == (1, 2)
    assert torch.allclose(scales[:, 0], torch.tensor([3.0 / 7.5])) and torch.allclose(scales[:, 1], torch.tensor([0.5 / 7.5]))


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
