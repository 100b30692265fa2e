"""End-to-end tuning: the differentiable quantized model is the reference model, tuning lowers the KL to the
float model on windows it never saw, only continuous values change, and bad requests are one-line errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.eval.model_card import render_model_card
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.format.checkpoint import SourceCheckpoint
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.architectures import architecture_for
from nanoq_plugin.quantizers.block_runner import BlockRunner
from nanoq_plugin.quantizers.model_tuning import (
    ModelTuneSettings,
    QuantizedModel,
    next_token_kl,
    tune_checkpoint,
)
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe


def test_next_token_kl_is_the_kl_divergence():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                          log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(next_token_kl(teacher, student), expected)
    assert next_token_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("arch,recipe,tied", [("llama", "cb2g64", False), ("qwen3", "w4g128", False),
                                              ("qwen2", "qkv-fp16", True)])
def test_quantized_model_is_the_reference_model(make_tiny_model, tmp_path, arch, recipe, tied):
    """With zero deltas its logits are those of transformers' model carrying the reference dequantization
    (Qwen3's q/k norms, a quantized embedding with the head tied over it, float q/k/v beside int4)."""
    source = make_tiny_model(arch, tmp_path / "src", dtype=torch.float32, tie_word_embeddings=tied)
    quantize_checkpoint(source, tmp_path / "q", load_recipe(recipe), progress=False)
    checkpoint = load_nano_checkpoint(tmp_path / "q")
    config = SourceCheckpoint(source).config
    runner = BlockRunner(config, torch.device("cpu"))
    model = QuantizedModel(checkpoint, architecture_for(config, "test"), runner, config["num_hidden_layers"])
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dequantized_float_model(source, tmp_path / "q")(ids).logits
        torch.testing.assert_close(model.logits(ids), expected, rtol=1e-4, atol=1e-4)
    assert model.deltas() and all(d.requires_grad for d in model.deltas())

    # recomputing each block in the backward pass gives the same gradients as keeping its activations
    gradients = {}
    for recompute in (False, True):
        model.recompute = recompute
        for delta in model.deltas():
            delta.grad = None
        next_token_kl(expected, model.logits(ids) * 1.1).backward()
        gradients[recompute] = [delta.grad.clone() for delta in model.deltas()]
    assert any(g.abs().sum() > 0 for g in gradients[True])
    for kept, recomputed in zip(gradients[False], gradients[True]):
        torch.testing.assert_close(recomputed, kept, rtol=1e-5, atol=1e-7)


def _held_out_kl(source, nano_dir, ids):
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        return next_token_kl(base, dequantized_float_model(source, nano_dir)(ids).logits).item()


def test_tuning_lowers_the_kl_on_unseen_text(tiny_llama_with_tokenizer, tmp_path, wikitext):
    """A cb2 checkpoint whose scales were knocked off by 30% noise: tuning finds scales that bring the KL to
    the float model down on text it never saw (a random-weight model's own quantization error is too flat a
    signal to show much; the real model's gain is measured in test_real_model and benchmarks/quality.py)."""
    source = tiny_llama_with_tokenizer
    quantize_checkpoint(source, tmp_path / "rtn", load_recipe("cb2g64"), progress=False)
    shutil.copytree(tmp_path / "rtn", tmp_path / "noisy")
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (t * (1 + 0.3 * torch.randn(t.shape, generator=generator))).to(t.dtype)
               if name.endswith("scales") else t for name, t in load_file(tmp_path / "rtn/model.safetensors").items()}
    save_file(tensors, tmp_path / "noisy/model.safetensors", metadata={"format": "pt"})
    settings = ModelTuneSettings(steps=48, lr=2e-2, windows=8, seq_len=64)
    result = tune_checkpoint(source, tmp_path / "noisy", tmp_path / "tuned", str(wikitext), settings, progress=False)

    record = result.manifest["provenance"]["e2e_tuning"]
    assert record["kept"] and record["held_out_kl_after"] < record["held_out_kl_before"]
    assert record["steps"] == 48 and record["windows"] == 8
    card = render_model_card(result.manifest, {})
    assert f"End-to-end tuning: 48 steps on 8 windows; KL to the float model on 4 held-out windows " \
           f"{record['held_out_kl_before']} -> {record['held_out_kl_after']} (kept)" in card
    # codes are untouched; scales, codebook levels and norms moved; the manifest's sizes are unchanged
    before, after = load_file(tmp_path / "noisy/model.safetensors"), load_file(tmp_path / "tuned/model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        if name.endswith("qweight") or "embed" in name:
            assert torch.equal(after[name], tensor), name
    for suffix in ("scales", "codebook", "layernorm.weight", "model.norm.weight"):
        assert any(not torch.equal(after[n], before[n]) for n in before if n.endswith(suffix)), suffix
    noisy_manifest = json.loads((tmp_path / "noisy/nano_manifest.json").read_text())
    assert result.manifest["totals"] == noisy_manifest["totals"]
    assert result.manifest["modules"].keys() == noisy_manifest["modules"].keys()
    load_nano_checkpoint(tmp_path / "tuned")

    text = wikitext.read_text(encoding="utf-8")[40000:50000]  # not among the calibration windows' text
    ids = AutoTokenizer.from_pretrained(source)(text, return_tensors="pt").input_ids[:, :256].view(4, 64)
    kl = {name: _held_out_kl(source, tmp_path / name, ids) for name in ("rtn", "noisy", "tuned")}
    assert kl["tuned"] < 0.85 * kl["noisy"], kl


def test_tuning_is_deterministic(tiny_llama_with_tokenizer, tmp_path, wikitext):
    source = tiny_llama_with_tokenizer
    quantize_checkpoint(source, tmp_path / "q", load_recipe("cb3g128"), progress=False)
    settings = ModelTuneSettings(steps=4, lr=1e-2, windows=4, seq_len=32)
    for name in ("a", "b"):
        tune_checkpoint(source, tmp_path / "q", tmp_path / name, str(wikitext), settings, progress=False)
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], t) for n, t in load_file(tmp_path / "q/model.safetensors").items())


def test_quantize_with_e2e_steps_writes_the_tuned_checkpoint(tiny_llama_with_tokenizer, tmp_path, wikitext, capsys):
    status = main(["quantize", str(tiny_llama_with_tokenizer), str(tmp_path / "out"), "--recipe", "w4g128",
                   "--calib", str(wikitext), "--calib-windows", "8", "--calib-seq-len", "64", "--e2e-steps", "6",
                   "--e2e-windows", "6", "--quiet"])
    assert status == 0
    assert "end-to-end tuning: held-out KL to the float model" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out/nano_manifest.json").read_text())
    assert manifest["provenance"]["e2e_tuning"]["steps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the first stage's folder is gone


def test_e2e_errors_are_one_line_and_write_nothing(tiny_llama, tmp_path, wikitext, capsys):
    with pytest.raises(NanoqError, match="--e2e-steps tunes against the float model on calibration text"):
        quantize_checkpoint(tiny_llama, tmp_path / "out", load_recipe("w4g128"), progress=False,
                            e2e=ModelTuneSettings(steps=4))
    with pytest.raises(NanoqError, match="--e2e-steps: method awq folds scales"):
        quantize_checkpoint(tiny_llama, tmp_path / "out", load_recipe("w4g128").with_method("awq"),
                            calibration=str(wikitext), progress=False, e2e=ModelTuneSettings(steps=4))
    assert not (tmp_path / "out").exists()

    quantize_checkpoint(tiny_llama, tmp_path / "rtn", load_recipe("w4g128"), progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] = 128
    (other / "config.json").write_text(json.dumps(config))
    tensors = load_file(other / "model.safetensors")
    for layer in range(config["num_hidden_layers"]):  # a consistent float model, of another MLP width
        for name in ("gate_proj", "up_proj"):
            key = f"model.layers.{layer}.mlp.{name}.weight"
            tensors[key] = tensors[key][:128].clone()
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        tensors[key] = tensors[key][:, :128].clone()
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    status = main(["tune", str(other), str(tmp_path / "rtn"), str(tmp_path / "tuned"), "--calib", str(wikitext),
                   "--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "module 'model.layers.0.mlp.down_proj' [96, 256] does not match the float model" in err[0]
    assert not (tmp_path / "tuned").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    status = main(["tune", str(tiny_llama), str(tmp_path / "rtn"), str(tmp_path / "taken"), "--calib", str(wikitext),
                   "--steps", "400"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "already exists and is not empty" in err[0]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]

    status = main(["tune", str(tiny_llama), str(tmp_path / "rtn"), str(tmp_path / "tuned"), "--calib", str(wikitext),
                   "--steps", "4", "--windows", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["nanoq: error: argument --windows: expected a positive integer, got '0' "
                                   "(see `nanoq tune --help`)"]
    assert not (tmp_path / "tuned").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
