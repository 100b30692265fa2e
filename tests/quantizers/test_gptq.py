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
