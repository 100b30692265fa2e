"""AWQ: the scale search lowers the output error on inputs with outlier channels, and the pipeline's folding
of scales into norms and up_proj keeps the model's function."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.awq import output_error, search_scales
from nanoq_plugin.quantizers.gptq import HessianAccumulator
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from nanoq_plugin.quantizers.rtn import quantize_rtn


def outlier_inputs(samples: int, features: int, seed: int) -> torch.Tensor:
    """Activations whose few salient channels are 30x the rest (what AWQ protects)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=generator)[:6]] = 30.0
    return torch.randn(samples, features, generator=generator) * scale


@pytest.mark.parametrize("name", ["int4g128", "int3g64-asym", "int8"])
def test_scale_search_lowers_the_output_error(name):
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 256, generator=generator), torch.randn(32, 256, generator=generator)]
    x = outlier_inputs(4096, 256, seed=1)
    hessian = HessianAccumulator(256, torch.device("cpu"))
    hessian.add(x)
    scale, ratio = search_scales(weights, [scheme, scheme], hessian.hessian, x.abs().mean(0))
    assert scale.shape == (256,) and torch.all(scale > 0)
    assert 0 <= ratio < 1  # the outliers make some scaling worth it
    assert search_scales(weights, [scheme, scheme], hessian.hessian, x.abs().mean(0))[1] == ratio  # deterministic

    def error(scaling):
        total = 0.0
        for weight in weights:
            restored = dequantize(quantize_rtn(weight * scaling, scheme), scheme, *weight.shape) / scaling
            total += output_error(weight, restored, hessian.hessian)
        return total
    assert error(scale) < 0.7 * error(torch.ones(256))


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_pipeline_folds_scales_and_beats_rtn(method, tiny_llama_with_tokenizer, tmp_path, wikitext):
    source = tiny_llama_with_tokenizer
    ids = torch.randint(0, 49152, (4, 48), generator=torch.Generator().manual_seed(3))

    def logits(directory):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(ids).logits

    base = logits(source)
    errors = {}
    for name, recipe in (("w8", "w8"), ("w3", "w3g128")):
        out = quantize_checkpoint(source, tmp_path / f"{method}-{name}", load_recipe(recipe).with_method(method),
                                  calibration=str(wikitext), progress=False, calib_windows=8, calib_seq_len=64)
        ratios = out.manifest["provenance"]["calibration"]["awq_ratios"]
        assert set(ratios) == {f"model.layers.{i}.{p}" for i in range(2)
                               for p in ("input_layernorm", "post_attention_layernorm", "mlp.up_proj")}
        got = logits(tmp_path / f"{method}-{name}")
        errors[name] = (torch.linalg.norm(got - base) / torch.linalg.norm(base)).item()
        with torch.no_grad():  # the benchmark's scoring model carries the folded norms too
            reference = dequantized_float_model(source, tmp_path / f"{method}-{name}")(ids).logits
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    quantize_checkpoint(source, tmp_path / "rtn", load_recipe("w3g128"), progress=False)
    rtn = (torch.linalg.norm(logits(tmp_path / "rtn") - base) / torch.linalg.norm(base)).item()
    assert errors["w8"] < 0.01, errors  # folded scales keep the function: only int8 rounding is left
    assert errors["w3"] < rtn, (errors, rtn)
