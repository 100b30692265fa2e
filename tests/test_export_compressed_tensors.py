"""`nanoq export compressed-tensors`: the exported checkpoint loads in transformers through the
compressed-tensors package and computes what the nano checkpoint's reference dequantization computes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from nanoq_plugin.cli import main
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe


@pytest.mark.parametrize("preset, flags, quant_format", [
    ("nvfp4", [], "nvfp4-pack-quantized"), ("w4g128", [], "pack-quantized"), ("w8", [], "pack-quantized"),
    ("w8", ["--activations", "int8"], "int-quantized"), ("w8a8", [], "int-quantized")])
def test_export_reloads_in_transformers(preset, flags, quant_format, tmp_path, make_tiny_model):
    source = make_tiny_model("llama", tmp_path / "src", tie_word_embeddings=True)
    recipe = load_recipe(preset)
    if preset == "w4g128":  # int8 embeddings with the head tied over them: written dequantized
        from dataclasses import replace

        from nanoq_plugin.format.schemes import INT8_CHANNEL
        recipe = replace(recipe, embeddings=INT8_CHANNEL)
    quantize_checkpoint(source, tmp_path / "nano", recipe, progress=False)
    assert main(["export", "compressed-tensors", str(tmp_path / "nano"), str(tmp_path / "ct"), *flags]) == 0
    config = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == quant_format
    assert "lm_head" in config["ignore"]
    inputs = [group.get("input_activations") for group in config["config_groups"].values()]
    if quant_format == "int-quantized":  # W8A8: dynamic symmetric int8 per token
        assert all(a["num_bits"] == 8 and a["strategy"] == "token" and a["dynamic"] and a["symmetric"] for a in inputs)
    else:
        assert inputs == [None] * len(inputs)
    with safe_open(str(tmp_path / "ct/model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        q_proj = "model.layers.0.self_attn.q_proj"
        if quant_format == "int-quantized":  # int8 [N, K] and float32 [N, 1] scales, as vLLM allocates them
            assert handle.get_tensor(f"{q_proj}.weight").dtype == torch.int8
            assert handle.get_tensor(f"{q_proj}.weight_scale").dtype == torch.float32
            assert handle.get_tensor(f"{q_proj}.weight_scale").shape[1] == 1
        else:
            assert f"{q_proj}.weight_packed" in names and f"{q_proj}.weight" not in names

    # compressed-tensors decompresses into the checkpoint dtype (bfloat16) whatever dtype is asked for (a float32
    # load then fails on mixed dtypes): load in bfloat16, compare every weight with the reference dequantization
    # rounded the same way, then the logits
    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    reference = dequantized_float_model(source, tmp_path / "nano")
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            got_weight = exported.get_submodule(name).weight.detach()
            want_weight = module.weight.detach().to(torch.bfloat16)
            if preset == "nvfp4":  # the same bits
                assert torch.equal(got_weight, want_weight), name
            else:  # float16 scales become the model's bfloat16 (vLLM does the same): one bf16 rounding apart
                torch.testing.assert_close(got_weight, want_weight, rtol=2**-6, atol=1e-6)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = exported(ids).logits.float(), reference(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_mixed_or_asymmetric_schemes_are_refused_with_one_line(tmp_path, make_tiny_model, capsys):
    source = make_tiny_model("llama", tmp_path / "src")
    quantize_checkpoint(source, tmp_path / "asym", load_recipe("w4g128-asym"), progress=False)
    capsys.readouterr()
    assert main(["export", "compressed-tensors", str(tmp_path / "asym"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoq: error: model.layers.") and "has no compressed-tensors export" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
