"""GPTQ: the algorithm on synthetic layers (vs RTN on the layer-output error it minimises), and the
calibrated pipeline end to end on a tiny Llama with a real tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import nanoq_plugin  # noqa: F401  (registers the transformers quantizer)
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.gptq import HessianAccumulator, gptq_quantize
from nanoq_plugin.quantizers.settings import GptqSettings
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from nanoq_plugin.quantizers.rtn import quantize_rtn


def correlated_inputs(samples: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features and a few large channels (what makes GPTQ beat RTN)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=generator)[:8]] = 8.0
    return (torch.randn(samples, features, generator=generator) @ mixing) * scale


def output_error(weight, restored, x):
    return (torch.linalg.norm(x @ (weight - restored).t()) / torch.linalg.norm(x @ weight.t())).item()


@pytest.mark.parametrize("name", ["int4g64", "int3g128", "int4g32-asym", "int2g64", "int8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_the_layer_output(name, act_order):
    scheme = parse_scheme(name)
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    x = correlated_inputs(2048, 256, seed=1)
    accumulator = HessianAccumulator(256, torch.device("cpu"))
    for chunk in x.split(500):
        accumulator.add(chunk)
    torch.testing.assert_close(accumulator.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    stored = gptq_quantize(weight, accumulator.hessian, scheme, GptqSettings(act_order=act_order))
    restored = dequantize(stored, scheme, 96, 256)
    rtn = dequantize(quantize_rtn(weight, scheme), scheme, 96, 256)
    gptq_err, rtn_err = output_error(weight, restored, x), output_error(weight, rtn, x)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_dead_inputs_get_zero_weight_and_bad_hessian_shape_is_named():
    weight = torch.randn(32, 64)
    x = correlated_inputs(512, 64, seed=2)
    x[:, 5] = 0
    hessian = 2 * x.t() @ x / 512
    restored = dequantize(gptq_quantize(weight, hessian, parse_scheme("int4g32")), parse_scheme("int4g32"), 32, 64)
    assert torch.all(restored[:, 5] == 0)
    with pytest.raises(NanoqError, match=r"layer.x: Hessian is \[32, 32\], expected \[64, 64\]"):
        gptq_quantize(weight, torch.eye(32), parse_scheme("int4g32"), where="layer.x")


def test_gptq_pipeline_end_to_end(tiny_llama_with_tokenizer, tmp_path, wikitext):
    source = tiny_llama_with_tokenizer
    recipe = load_recipe("w3g128").with_method("gptq")
    with pytest.raises(NanoqError, match="method gptq needs calibration text"):
        quantize_checkpoint(source, tmp_path / "none", recipe, progress=False)
    gptq = quantize_checkpoint(source, tmp_path / "gptq", recipe, calibration=str(wikitext), progress=False,
                               calib_windows=8, calib_seq_len=64)
    quantize_checkpoint(source, tmp_path / "rtn", load_recipe("w3g128"), progress=False)
    calibration = gptq.manifest["provenance"]["calibration"]
    assert calibration["used"] and calibration["windows"] == 8 and calibration["true_sequential"]
    assert json.loads((tmp_path / "gptq/config.json").read_text())["quantization_config"]["modules"]

    ids = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        errors = {name: (torch.linalg.norm(AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)(
            ids).logits - base) / torch.linalg.norm(base)).item() for name in ("gptq", "rtn")}
    assert errors["gptq"] < errors["rtn"], errors


def test_hessian_accumulator_is_the_mean_outer_product_across_chunks():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 50, 300, generator=generator) for _ in range(3)]  # 300: tiles of 128 + a ragged one
    accumulator = HessianAccumulator(300, torch.device("cpu"))
    for chunk in chunks:
        accumulator.add(chunk)
    x = torch.cat(chunks).reshape(-1, 300).double()
    expected = 2.0 / x.shape[0] * x.t() @ x
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert accumulator.samples == 450


def test_calib_self_samples_windows_from_the_model(tiny_llama_with_tokenizer, tmp_path):
    from nanoq_plugin.quantizers.calibration import calibration_windows

    first = calibration_windows(tiny_llama_with_tokenizer, "self", 3, 12)
    assert first.shape == (3, 12) and first.dtype == torch.int64
    assert torch.equal(first, calibration_windows(tiny_llama_with_tokenizer, "self", 3, 12))  # seeded
    assert len(set(first[:, 1:].flatten().tolist())) > 5  # sampled, not a repeated token
    out = quantize_checkpoint(tiny_llama_with_tokenizer, tmp_path / "self", load_recipe("w4g128").with_method("gptq"),
                              calibration="self", progress=False, calib_windows=2, calib_seq_len=16)
    assert out.manifest["provenance"]["calibration"]["self_generated"]


def test_hessian_preparation_in_place_equals_the_textbook_one():
    """The permutation and the inverse factor are made in the Hessian's own memory; they equal
    `h[order][:, order]` and `cholesky(cholesky_inverse(cholesky(h)), upper=True)` computed with copies."""
    from nanoq_plugin.quantizers.gptq import PERMUTE_CHUNK, inverse_factor_, permute_symmetric_, prepare_hessian

    k = 2 * PERMUTE_CHUNK + 40  # several chunks, the last one partial
    x = correlated_inputs(4 * k, k, seed=3)
    h = x.t() @ x / x.shape[0]
    order = torch.randperm(k, generator=torch.Generator().manual_seed(4))
    permuted = h.clone()
    assert permute_symmetric_(permuted, order).data_ptr() == permuted.data_ptr()
    assert torch.equal(permuted, h[order][:, order])

    damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(k)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    memory = damped.clone()
    factor = inverse_factor_(memory)
    assert factor.data_ptr() == memory.data_ptr()
    torch.testing.assert_close(factor, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    settings = GptqSettings(act_order=True)
    given = h.clone()
    prepared = prepare_hessian(given, settings, in_place=True)
    assert prepared.inverse_factor.data_ptr() == given.data_ptr()  # the Hessian's memory was reused
    fresh = prepare_hessian(h, settings)
    assert prepared.inverse_factor.data_ptr() != h.data_ptr() and torch.equal(h, x.t() @ x / x.shape[0])
    torch.testing.assert_close(prepared.inverse_factor, fresh.inverse_factor)


def test_hessian_preparation_in_place_allocates_no_square_matrix():
    """Peak memory of `prepare_hessian(in_place=True)` at K = 3072 (36 MiB float32) stays well below one more
    K x K matrix (Linux's peak-RSS counter, reset before the call, in a fresh process)."""
    import os
    import subprocess
    import sys

    script = """
import torch
from nanoq_plugin.quantizers.gptq import prepare_hessian
from nanoq_plugin.quantizers.settings import GptqSettings

def field(name):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(name))

k = 3072
x = torch.randn(k, 512)
h = x @ x.t() / 512
del x
prepare_hessian(h.clone(), GptqSettings(act_order=True))  # warm up LAPACK and the allocator
open("/proc/self/clear_refs", "w").write("5")
start = field("VmRSS")
prepare_hessian(h, GptqSettings(act_order=True), in_place=True)
print((field("VmHWM") - start) / (k * k * 4))
"""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak-RSS counter")
    extra = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert extra < 0.5, f"prepare_hessian(in_place=True) peaked {extra:.2f} K x K matrices above its input"
