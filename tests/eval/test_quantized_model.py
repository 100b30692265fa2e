"""`nanoq eval` scores weight-only modules dequantized once: the same numbers as through the kernels (the CPU
reference dequantizes on every call), int8-a8 through its kernel."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from nanoq_plugin.cli import main
from nanoq_plugin.engines.transformers import NanoLinear, NanoTiedHead
from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.eval.quantized_model import load_quantized_model
from nanoq_plugin.eval.runner import run_eval
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

TEXT = " ".join(f"The river {i} runs to the sea, and the quick brown fox jumps over {i + 7} lazy dogs."
                for i in range(40))
# the reference kernel and the dequantized float module compute the same float32 product bit for bit; a
# codebook's kernel rotates the input where the float module holds the unrotated weight (float rounding)
EXACT = {"w8": True, "w4g128": True, "w4g128-asym": True, "nvfp4": True, "qkv-fp16": True, "cb3g128": False}


@pytest.fixture
def tied_source(tmp_path, make_tiny_model):
    """A tiny tied Llama in float32 (so that eval's float32 models hold its weights exactly) with a 320-token BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = make_tiny_model("llama", tmp_path / "src", tie_word_embeddings=True,
                                dtype=torch.float32)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    (directory / "text.txt").write_text(TEXT)
    return directory


def _quantize(source, tmp_path, preset):
    out = tmp_path / f"nano-{preset}"
    quantize_checkpoint(source, out, load_recipe(preset), progress=False)
    return load_nano_checkpoint(out)


@pytest.mark.parametrize("preset", sorted(EXACT))
def test_dequantized_scoring_equals_the_kernels(tied_source, tmp_path, preset):
    checkpoint = _quantize(tied_source, tmp_path, preset)
    kernels, described_kernels = load_quantized_model(checkpoint, torch.float32, "kernels")
    fast, described = load_quantized_model(checkpoint, torch.float32, "dequantized")
    source = AutoModelForCausalLM.from_pretrained(tied_source, dtype=torch.float32).eval()
    modules = checkpoint.quant_config.modules
    assert described == {"mode": "dequantized", "dequantized_modules": len(modules), "kernel_modules": {}}
    assert described_kernels["dequantized_modules"] == 0 and sum(described_kernels["kernel_modules"].values()) == len(modules)
    assert not any(isinstance(m, (NanoLinear, NanoTiedHead)) for m in fast.modules())
    assert all(p.is_contiguous() for p in fast.parameters())  # the layout the float model's GEMMs run on
    if checkpoint.quant_config.tied_lm_head is not None:  # qkv-fp16: int8 table, the head shares its weight
        assert fast.lm_head.weight is fast.get_submodule(checkpoint.quant_config.tied_lm_head).weight

    ids = torch.randint(0, 320, (160,), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity({"kernels": kernels, "dequantized": fast, "source": source}, ids, ctx=64, stride=32,
                                 reference="kernels", progress=False)
    with torch.inference_mode():
        got, want = fast(ids[None, :64]).logits, kernels(ids[None, :64]).logits
    if EXACT[preset]:
        assert torch.equal(got, want)
        assert result.perplexity["dequantized"] == result.perplexity["kernels"]
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert result.perplexity["dequantized"] == pytest.approx(result.perplexity["kernels"], rel=1e-5)
    # and it is the quantized model, not the source's float weights
    assert result.perplexity["dequantized"] != result.perplexity["source"]
    assert not torch.allclose(got, source(ids[None, :64]).logits, rtol=1e-6, atol=1e-6)


def test_int8_a8_keeps_its_kernel(tied_source, tmp_path):
    checkpoint = _quantize(tied_source, tmp_path, "w8a8-embed")
    model, described = load_quantized_model(checkpoint, torch.float32)
    modules = checkpoint.quant_config.modules
    assert described == {"mode": "dequantized", "dequantized_modules": 0, "kernel_modules": {"int8-a8": len(modules)}}
    assert isinstance(model.lm_head, NanoTiedHead)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), NanoLinear)


def test_eval_summary_names_the_scoring_and_matches_the_kernels(tied_source, tmp_path, capsys):
    checkpoint = _quantize(tied_source, tmp_path, "w4g128")
    text = tied_source / "text.txt"
    slow = run_eval(str(checkpoint.directory), text_file=str(text), ctx=64, stride=32, scoring="kernels",
                    progress=False)
    assert main(["eval", str(checkpoint.directory), "--base", str(tied_source), "--text", str(text), "--ctx", "64",
                 "--stride", "32", "--quiet"]) == 0
    summary = json.loads((checkpoint.directory / "eval_summary.json").read_text())
    assert summary["scoring"] == {"mode": "dequantized", "dequantized_modules": 14, "kernel_modules": {}}
    assert slow["scoring"]["mode"] == "kernels"
    assert summary["perplexity"] == slow["perplexity"] and summary["protocol"] == slow["protocol"]
    assert summary["ppl_ratio"] != 1.0
    assert [s["quantized"] for s in summary["samples"]] == [s["quantized"] for s in slow["samples"]]
    card = (checkpoint.directory / "README.md").read_text()
    assert "Scored with the weights of 14 modules dequantized once" in card
    with pytest.raises(Exception, match="scoring 'fast' is not one of dequantized, kernels"):
        load_quantized_model(checkpoint, torch.float32, "fast")


def test_progress_bar_shows_eta_and_running_perplexity(tied_source, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tied_source, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (160,), generator=torch.Generator().manual_seed(0))
    evaluate_perplexity({"base": model}, ids, ctx=64, stride=32, progress=True)
    err = capsys.readouterr().err
    assert "perplexity: 100%" in err and "window" in err and "<00:00" in err and "base=" in err
    assert isinstance(model.lm_head, nn.Linear)


def test_a_mixed_checkpoint_dequantizes_its_weight_only_modules_and_keeps_int8_a8(tied_source, tmp_path):
    from nanoq_plugin.format.schemes import INT8_DYNAMIC_A8, parse_scheme
    from nanoq_plugin.quantizers.recipe import Recipe, Rule

    recipe = Recipe("mixed", INT8_DYNAMIC_A8, rules=(Rule(r"mlp\.down_proj$", parse_scheme("int4g32")),))
    out = tmp_path / "nano-mixed"
    quantize_checkpoint(tied_source, out, recipe, progress=False)
    checkpoint = load_nano_checkpoint(out)
    kernels, _ = load_quantized_model(checkpoint, torch.float32, "kernels")
    fast, described = load_quantized_model(checkpoint, torch.float32)
    assert described == {"mode": "dequantized", "dequantized_modules": 2, "kernel_modules": {"int8-a8": 12}}
    assert isinstance(fast.get_submodule("model.layers.1.mlp.down_proj"), nn.Linear)
    assert isinstance(fast.get_submodule("model.layers.1.mlp.up_proj"), NanoLinear)
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(fast(ids).logits, kernels(ids).logits)


def test_dequantized_scoring_chooses_no_kernel(tied_source, tmp_path, monkeypatch, capsys):
    """A weight-only checkpoint scored dequantized chooses no kernel, so no fallback to the reference is warned
    about or, under NANOQ_STRICT_KERNELS=1, refused (the reference is what float32 activations get for int4 on an
    AVX-512 BF16 CPU)."""
    from nanoq_plugin.kernels import dispatch

    checkpoint = _quantize(tied_source, tmp_path, "w4g128")
    monkeypatch.setenv("NANOQ_STRICT_KERNELS", "1")
    monkeypatch.setattr(dispatch, "_reported", set())
    load_quantized_model(checkpoint, torch.float32)
    assert "nanoq:" not in capsys.readouterr().err
