"""Every family the suite covers, discovered from its transformers class: quantized with RTN and GPTQ, loaded by
transformers, its logits equal to the float model rebuilt from the reference dequantization; an architecture in
no list of ours goes the same way; one whose anatomy cannot be read is refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import nanoq_plugin  # noqa: F401  (registers the transformers quantizer)
from nanoq_plugin.engines.transformers import NanoLinear
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES, architecture_for
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

UNLISTED = "starcoder2"  # a decoder transformers and vLLM both have, in no table of ours (LayerNorm, plain MLP)


WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", [*TESTED_FAMILIES, UNLISTED])
def test_family_quantizes_and_loads_with_logits_of_the_reference(family, method, tmp_path, make_tiny_model,
                                                                 smollm2_dir):
    source = make_tiny_model(family, tmp_path / family, dtype=torch.float32, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # calibration text is tokenized with it
        shutil.copy(smollm2_dir / name, source / name)
    arch = architecture_for(json.loads((source / "config.json").read_text()), "config.json")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: w4\nmethod: {method}\ndefault: int4g32\n")
    out = tmp_path / f"{family}-{method}"
    calibration = {} if method == "rtn" else {"calibration": str(WIKITEXT),
                                              "calib_windows": 4, "calib_seq_len": 32}
    quantize_checkpoint(source, out, load_recipe(str(recipe)), progress=False, **calibration)

    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert sorted(modules) == sorted(arch.linears_of_block(0) + arch.linears_of_block(1))
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(isinstance(m, NanoLinear) for m in quantized.modules()) == len(modules)
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = quantized(ids).logits
        want = dequantized_float_model(source, out)(ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, float_logits, atol=1e-5)  # it really is quantized
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0)
    assert cosine > 0.9, f"{family} {method}: logits cosine {cosine:.3f} to the float model"


def test_an_architecture_whose_blocks_hold_no_linear_is_refused_in_one_line():
    with pytest.raises(NanoqError, match=r"cfg.json: the decoder blocks of GPT2LMHeadModel hold no nn.Linear"):
        architecture_for({"model_type": "gpt2"}, "cfg.json")


def test_a_model_type_transformers_does_not_know_is_refused_in_one_line():
    with pytest.raises(NanoqError, match=r"cfg.json: model_type 'no-such-model' is not a model transformers knows"):
        architecture_for({"model_type": "no-such-model"}, "cfg.json")


def test_gemma_norms_are_one_plus_w_and_the_gated_mlp_folds_into_up():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64,
                                  pad_token_id=0).to_dict()
    groups = {g.linears: g for g in architecture_for(config, "config.json").groups}
    attention = groups[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert (attention.producer, attention.norm_offset) == ("input_layernorm", 1.0)
    assert groups[("mlp.gate_proj", "mlp.up_proj")].producer == "pre_feedforward_layernorm"
    assert groups[("mlp.down_proj",)].producer == "mlp.up_proj"
    assert groups[("self_attn.o_proj",)].producer is None  # attention is not linear in v's scale per channel
    llama = {g.linears: g for g in architecture_for({"model_type": "llama"}, "config.json").groups}
    assert llama[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")].norm_offset == 0.0


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "granite", "olmo2", "phi3"])
def test_awq_folds_scales_exactly_whatever_the_norm_convention(family, tmp_path, make_tiny_model, smollm2_dir):
    """AWQ with int8 weights barely changes a model, so its logits stay the float model's, unless a scale
    was folded into a producer wrongly (e.g. into Gemma's `w` instead of `1 + w`)."""
    source = make_tiny_model(family, tmp_path / family, dtype=torch.float32, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, source / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: w8-awq\nmethod: awq\ndefault: int8\n")
    out = tmp_path / "awq"
    quantize_checkpoint(source, out, load_recipe(str(recipe)), progress=False, calibration=str(WIKITEXT),
                        calib_windows=4, calib_seq_len=32)
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0)
    assert cosine > 0.999, f"{family}: cosine {cosine:.5f} to the float model after AWQ int8"


@pytest.mark.parametrize("model_type, router, first", [
    ("qwen3_moe", "mlp.gate", "model.layers.0.mlp.experts.0.gate_proj"),
    ("mixtral", "mlp.gate", "model.layers.0.block_sparse_moe.experts.0.w1"),
    ("phimoe", "mlp.router", "model.layers.0.block_sparse_moe.experts.0.w1")])
def test_a_mixture_of_experts_is_discovered_with_its_router_and_saved_expert_names(model_type, router, first):
    arch = architecture_for({"model_type": model_type, "num_hidden_layers": 2}, "cfg.json")
    assert arch.experts.router == router and arch.experts.roles == ("gate_up_proj", "down_proj")
    assert arch.expert_modules(0)["gate_up_proj"][0] == first
    assert len(arch.expert_modules(1)["down_proj"]) == arch.experts.num_experts
    assert not set(arch.gate_modules(0)) & set(arch.linears_of_block(0))  # routers are not quantized by default


@pytest.mark.parametrize("model_type, what", [
    ("jamba", "blocks of different anatomy"), ("granitemoe", "not as one linear weight per expert"),
    ("qwen3_next", "one experts module per block")])
def test_a_mixture_of_experts_that_cannot_be_read_is_refused_in_one_line(model_type, what):
    with pytest.raises(NanoqError, match=f"^cfg.json: .*{what}") as err:
        architecture_for({"model_type": model_type, "num_hidden_layers": 2}, "cfg.json")
    assert "\n" not in str(err.value)
