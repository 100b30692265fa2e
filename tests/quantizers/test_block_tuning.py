"""Block-output tuning after GPTQ: the trainable dequantization is the reference's, the tuned tensors store
what was trained, tuning lowers the quantized model's error, and it is refused where nothing is calibrated."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.reference import compress, dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.block_tuning import TunableLinear
from nanoq_plugin.quantizers.settings import TuneSettings
from nanoq_plugin.quantizers.codebook import quantize_codebook
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from nanoq_plugin.quantizers.rtn import quantize_rtn, rtn_scales


def _stored(weight, scheme):
    if scheme.name.startswith("cb"):
        return quantize_codebook(weight, scheme)
    if scheme.symmetric:
        return quantize_rtn(weight, scheme)
    scales, zeros = rtn_scales(weight, scheme, False)
    return compress(weight, scheme, scales, zeros)


@pytest.mark.parametrize("name", ["int4g32", "int3g32-asym", "int8", "cb3g32"])
def test_tunable_weight_is_the_reference_dequantization(name):
    scheme = parse_scheme(name)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    stored = _stored(weight, scheme)
    tunable = TunableLinear(stored, scheme, 48, 64, torch.device("cpu"))
    torch.testing.assert_close(tunable.weight(), dequantize(stored, scheme, 48, 64), rtol=1e-6, atol=1e-6)

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for delta in tunable.deltas:
            delta.copy_(0.1 * torch.randn(delta.shape, generator=generator))
    tuned = tunable.stored()
    assert torch.equal(tuned["qweight"], stored["qweight"])  # codes are fixed
    assert not torch.equal(tuned["scales"], stored["scales"])
    # the stored tensors are what was trained, up to the float16 rounding of the scales
    torch.testing.assert_close(dequantize(tuned, scheme, 48, 64), tunable.weight().detach(), rtol=2e-3, atol=2e-3)
    loss = tunable.weight().pow(2).sum()
    loss.backward()
    assert all(delta.grad is not None and delta.grad.abs().sum() > 0 for delta in tunable.deltas)


def _logit_error(model_dir, base_logits, ids):
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    return (torch.linalg.norm(logits - base_logits) / torch.linalg.norm(base_logits)).item()


def test_tuning_lowers_the_error_of_the_quantized_model(tiny_llama_with_tokenizer, tmp_path, wikitext):
    source = tiny_llama_with_tokenizer
    recipe = load_recipe("cb2g64").with_method("gptq")
    common = dict(calibration=str(wikitext), progress=False, calib_windows=16, calib_seq_len=64)
    quantize_checkpoint(source, tmp_path / "gptq", recipe, **common)
    tuned = quantize_checkpoint(source, tmp_path / "tuned", recipe, tune=TuneSettings(steps=24), **common)

    record = tuned.manifest["provenance"]["calibration"]["tuning"]
    assert record["steps"] == 24 and [b["block"] for b in record["blocks"]] == [0, 1]
    kept = [b for b in record["blocks"] if b["kept"]]
    assert kept and all(b["held_out_error_after"] < b["held_out_error_before"] for b in kept)
    # tuned norms are stored (in the source's dtype) and block 0 keeps the codes GPTQ chose (later blocks
    # see the tuned outputs of the blocks before, so GPTQ chooses other codes there)
    norms = {name: t for name, t in load_file(tmp_path / "tuned/model.safetensors").items() if "layernorm" in name}
    source_norms = load_file(source / "model.safetensors")
    assert any(not torch.equal(t, source_norms[name]) for name, t in norms.items())
    gptq_codes = load_file(tmp_path / "gptq/model.safetensors")
    tuned_codes = load_file(tmp_path / "tuned/model.safetensors")
    assert all(torch.equal(tuned_codes[name], t) for name, t in gptq_codes.items()
               if name.startswith("model.layers.0.") and name.endswith("qweight"))

    text = wikitext.read_text(encoding="utf-8")[20000:30000]
    ids = AutoTokenizer.from_pretrained(source)(text, return_tensors="pt").input_ids[:, :256].view(4, 64)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
    errors = {name: _logit_error(tmp_path / name, base, ids) for name in ("gptq", "tuned")}
    assert errors["tuned"] < errors["gptq"], errors
    assert json.loads((tmp_path / "tuned/config.json").read_text())["quantization_config"]["modules"]


def test_tuning_needs_a_calibrated_method(tiny_llama, tmp_path):
    with pytest.raises(NanoqError, match="--tune-steps fits a calibrated block"):
        quantize_checkpoint(tiny_llama, tmp_path / "out", load_recipe("w4g128"), progress=False,
                            tune=TuneSettings(steps=4))
    assert not (tmp_path / "out").exists()
