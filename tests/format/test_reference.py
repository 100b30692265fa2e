"""The reference dequantizer against a fake-quantizer written here from the formula in docs/FORMAT.md."""

import pytest
import torch

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.layout import param_specs
from nanoq_plugin.format.reference import compress, dequantize
from nanoq_plugin.format.schemes import INT8_CHANNEL, parse_scheme
from nanoq_plugin.quantizers.rtn import rtn_scales

GROUP_SCHEMES = [f"int{b}g{g}{s}" for b in (2, 3, 4, 8) for g in (32, 64, 128) for s in ("", "-asym")]


def fake_quantize(weight, bits, group, scales, zeros):
    """W -> (clamp(round(W / s) + z, 0, 2^b - 1) - z) * s with float16-rounded scales, per group along K."""
    n, k = weight.shape
    s = scales.to(torch.float16).float().t().repeat_interleave(group, dim=1)  # [N, K]
    z = (torch.full_like(s, 2 ** (bits - 1)) if zeros is None
         else zeros.float().t().repeat_interleave(group, dim=1))
    q = torch.clamp(torch.round(weight / s) + z, 0, 2**bits - 1)
    return (q - z) * s


@pytest.mark.parametrize("name", GROUP_SCHEMES)
@pytest.mark.parametrize("shape", [(33, 128), (7, 384)])
def test_group_round_trip_is_fake_quantization_bit_for_bit(name, shape):
    scheme = parse_scheme(name)
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    scales, zeros = rtn_scales(weight, scheme)
    tensors = compress(weight, scheme, scales, zeros)
    specs = param_specs(scheme, *shape)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        k: (s.shape, s.dtype) for k, s in specs.items()}
    restored = dequantize(tensors, scheme, *shape)
    assert torch.equal(restored, fake_quantize(weight, scheme.bits, scheme.group_size, scales, zeros))
    # every element within half a step of its group's scale (RTN clips no more than that), plus what
    # rounding the scale to float16 (relative 2^-11) can move the group's extreme value
    step = scales.to(torch.float16).float().t().repeat_interleave(scheme.group_size, dim=1)
    extreme = weight.abs().view(shape[0], -1, scheme.group_size).amax(dim=2).repeat_interleave(scheme.group_size, dim=1)
    assert ((restored - weight).abs() <= step / 2 + extreme * 2**-10 + 1e-6).all()


def test_int8_channel_round_trip():
    torch.manual_seed(1)
    weight = torch.randn(65, 96)
    scales, _ = rtn_scales(weight, INT8_CHANNEL)
    tensors = compress(weight, INT8_CHANNEL, scales)
    assert tensors["qweight"].dtype == torch.int8 and tensors["qweight"].shape == (96, 65)
    assert tensors["qweight"].abs().max() == 127
    s16 = scales.to(torch.float16).float()
    expected = torch.clamp(torch.round(weight / s16[:, None]), -127, 127) * s16[:, None]
    assert torch.equal(dequantize(tensors, INT8_CHANNEL, 65, 96), expected)


def test_all_zero_group_dequantizes_to_zero():
    weight = torch.zeros(4, 64)
    weight[0, 32:] = 1.0
    for name in ("int4g32", "int4g32-asym"):
        scheme = parse_scheme(name)
        restored = dequantize(compress(weight, scheme, *rtn_scales(weight, scheme)), scheme, 4, 64)
        assert torch.equal(restored[1:], weight[1:]) and torch.equal(restored[0, :32], weight[0, :32])


def test_dequantize_rejects_wrong_tensors():
    scheme = parse_scheme("int4g32")
    tensors = compress(torch.randn(8, 64), scheme, *rtn_scales(torch.randn(8, 64), scheme))
    with pytest.raises(NanoqError, match=r"tensor 'scales' is float32 \[2, 8\], expected float16 \[2, 8\]"):
        dequantize({**tensors, "scales": tensors["scales"].float()}, scheme, 8, 64)
    with pytest.raises(NanoqError, match="missing tensor 'qweight'"):
        dequantize({"scales": tensors["scales"]}, scheme, 8, 64)


def test_group_size_must_divide_input_dim():
    with pytest.raises(NanoqError, match=r"group size 128 does not divide input dim 576 \(choose group size 64 or 32\)"):
        compress(torch.randn(4, 576), parse_scheme("int4g128"), torch.ones(4, 4))
