"""NVFP4: E2M1 codes, the reference codec, and RTN with a shared global scale and scale inflation."""

import pytest
import torch

from nanoq_plugin.format.fp4 import E2M1_MAGNITUDES, decode_e2m1, encode_e2m1, pack_fp4, unpack_fp4
from nanoq_plugin.format.layout import param_specs
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import NVFP4, Scheme, parse_scheme
from nanoq_plugin.quantizers.nvfp4 import global_scale_for, packed_entropy_bits, quantize_nvfp4


def test_e2m1_round_trip_and_nearest_rounding():
    values = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES[1:]))
    assert torch.equal(decode_e2m1(encode_e2m1(values)), values)
    assert decode_e2m1(encode_e2m1(torch.tensor([0.2, 0.3, 2.4, 2.6, -5.2, 9.0]))).tolist() == [0, 0.5, 2, 3, -6, 6]
    codes = torch.randint(0, 16, (6, 5), dtype=torch.uint8)
    packed = pack_fp4(codes, 0)
    assert packed.shape == (3, 5) and torch.equal(unpack_fp4(packed, 0), codes)
    assert packed[0, 0].item() == codes[0, 0].item() | (codes[1, 0].item() << 4)  # even index in the low nibble


def test_scheme_name_specs_and_reference():
    assert parse_scheme("NVFP4") == NVFP4 and Scheme.from_dict(NVFP4.to_dict()) == NVFP4
    specs = param_specs(NVFP4, 8, 64)
    assert {n: (s.shape, s.dtype) for n, s in specs.items()} == {
        "qweight": ((32, 8), torch.uint8), "scales": ((4, 8), torch.float8_e4m3fn), "global_scale": ((1,), torch.float32)}
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    stored = quantize_nvfp4(weight, NVFP4)
    restored = dequantize(stored, NVFP4, 8, 64)
    # the dequantized weight is on the grid: quantizing it again gives the same bytes
    assert torch.equal(quantize_nvfp4(restored, NVFP4, stored["global_scale"])["qweight"], stored["qweight"])
    assert (torch.linalg.norm(restored - weight) / torch.linalg.norm(weight)).item() < 0.12


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_alpha_inflates_scales_and_lowers_entropy(alpha):
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    plain = quantize_nvfp4(weight, NVFP4)
    inflated = quantize_nvfp4(weight, NVFP4, alpha=alpha)
    error = lambda stored: torch.linalg.norm(dequantize(stored, NVFP4, 256, 512) - weight).item()  # noqa: E731
    if alpha == 1.0:
        assert torch.equal(inflated["qweight"], plain["qweight"])
    else:
        assert packed_entropy_bits(inflated["qweight"]) < packed_entropy_bits(plain["qweight"]) - 0.3
        assert error(inflated) > error(plain)
        assert torch.equal(inflated["global_scale"], global_scale_for(weight.abs().max().item(), alpha))
