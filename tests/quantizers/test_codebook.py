"""Codebook quantization: rotation, Lloyd-Max levels, GPTQ in the rotated space; and the format round trip."""

import pytest
import torch

from nanoq_plugin.format.hadamard import random_signs, rotate_hessian, rotate_inputs, rotate_weight, unrotate_weight
from nanoq_plugin.format.layout import param_specs
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import Scheme, parse_scheme
from nanoq_plugin.quantizers.codebook import gaussian_levels, quantize_codebook
from nanoq_plugin.quantizers.gptq import HessianAccumulator
from nanoq_plugin.quantizers.rtn import quantize_rtn

from test_gptq import correlated_inputs, output_error  # same folder (pytest puts it on sys.path)


def test_rotation_is_orthogonal_and_consistent():
    signs = random_signs(192, 0)
    assert torch.equal(signs, random_signs(192, 0)) and set(signs.tolist()) == {-1, 1}
    weight, x = torch.randn(10, 192), torch.randn(7, 192)
    rotated_w, rotated_x = rotate_weight(weight, signs, 64), rotate_inputs(x, signs, 64)
    torch.testing.assert_close(rotated_x @ rotated_w.t(), x @ weight.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unrotate_weight(rotated_w, signs, 64), weight, rtol=1e-5, atol=1e-5)
    inputs = torch.randn(300, 192)
    torch.testing.assert_close(rotate_hessian(inputs.t() @ inputs, signs, 64),
                               rotate_inputs(inputs, signs, 64).t() @ rotate_inputs(inputs, signs, 64),
                               rtol=1e-4, atol=1e-2)


def test_gaussian_levels_are_the_lloyd_max_optimum():
    assert torch.allclose(gaussian_levels(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=2e-3)
    assert torch.allclose(gaussian_levels(3)[4:], torch.tensor([0.2451, 0.7560, 1.3440, 2.1520]), atol=3e-3)


def test_scheme_grammar_and_specs():
    scheme = parse_scheme("cb3g64")
    assert scheme.name == "cb3g64" and Scheme.from_dict(scheme.to_dict()) == scheme
    specs = param_specs(scheme, 8, 128)
    assert {n: tuple(s.shape) for n, s in specs.items()} == {"qweight": (12, 8), "scales": (2, 8), "codebook": (8,),
                                                           "signs": (128,)}
    with pytest.raises(Exception, match="codebook scheme needs bits"):
        parse_scheme("cb8g64")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_beats_integer_rounding_on_heavy_tailed_weights(bits):
    generator = torch.Generator().manual_seed(bits)
    # heavy tails: a Gaussian times a power of a uniform
    weight = torch.randn(128, 256, generator=generator) * torch.rand(128, 256, generator=generator).pow(-0.35)
    codebook_scheme, int_scheme = parse_scheme(f"cb{bits}g64"), parse_scheme(f"int{bits}g64")
    stored = quantize_codebook(weight, codebook_scheme)
    assert torch.equal(stored["qweight"], quantize_codebook(weight, codebook_scheme)["qweight"])  # deterministic
    codebook_error = torch.linalg.norm(dequantize(stored, codebook_scheme, 128, 256) - weight)
    int_error = torch.linalg.norm(dequantize(quantize_rtn(weight, int_scheme), int_scheme, 128, 256) - weight)
    assert codebook_error < 0.85 * int_error, (codebook_error, int_error)


@pytest.mark.parametrize("name", ["cb2g64", "cb3g32"])
def test_gptq_in_the_rotated_space_beats_nearest_level(name):
    scheme = parse_scheme(name)
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    x = correlated_inputs(2048, 256, seed=1)
    accumulator = HessianAccumulator(256, torch.device("cpu"))
    accumulator.add(x)
    nearest = dequantize(quantize_codebook(weight, scheme), scheme, 96, 256)
    gptq = dequantize(quantize_codebook(weight, scheme, accumulator.hessian), scheme, 96, 256)
    assert output_error(weight, gptq, x) < 0.8 * output_error(weight, nearest, x)
