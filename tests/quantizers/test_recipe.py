import re

import pytest

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.architectures import architecture_for
from nanoq_plugin.quantizers.recipe import PRESETS, load_recipe, resolve_plan

ARCH = architecture_for({"model_type": "llama"}, "config.json")
# SmolLM2-135M block shapes: hidden 576, intermediate 1536
SHAPES = {
    "model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.self_attn.k_proj": (192, 576),
    "model.layers.0.self_attn.v_proj": (192, 576), "model.layers.0.self_attn.o_proj": (576, 576),
    "model.layers.0.mlp.gate_proj": (1536, 576), "model.layers.0.mlp.up_proj": (1536, 576),
    "model.layers.0.mlp.down_proj": (576, 1536),
}


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["w8", "w4g128", "w3g128", "w2g64"])
def test_required_presets_exist(name):
    assert name in PRESETS and load_recipe(name) is PRESETS[name]


def test_preset_falls_back_to_largest_dividing_group_size():
    plan = resolve_plan(load_recipe("w4g128"), ARCH, SHAPES)
    assert plan.modules["model.layers.0.self_attn.q_proj"].scheme.name == "int4g64"
    assert plan.modules["model.layers.0.self_attn.q_proj"].requested.name == "int4g128"
    assert plan.modules["model.layers.0.mlp.down_proj"].scheme.name == "int4g128"
    odd = resolve_plan(load_recipe("w4g128"), ARCH, {"model.layers.0.mlp.down_proj": (96, 96)})
    assert odd.modules["model.layers.0.mlp.down_proj"].scheme.name == "int4g32"


def test_yaml_rules_first_match_wins_and_float_keeps(tmp_path):
    recipe = load_recipe(write(tmp_path, """
default: int4g64-asym
rules:
  - match: 'self_attn\\.(q|k|v)_proj$'
    scheme: float
  - 'mlp\\.down_proj': int8
  - 'mlp': int2g32
"""))
    plan = resolve_plan(recipe, ARCH, SHAPES)
    schemes = {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1]: p.scheme.name for m, p in plan.modules.items()}
    assert schemes == {
        "self_attn.q_proj": "float", "self_attn.k_proj": "float", "self_attn.v_proj": "float",
        "self_attn.o_proj": "int4g64-asym", "mlp.gate_proj": "int2g32", "mlp.up_proj": "int2g32",
        "mlp.down_proj": "int8",
    }
    assert set(plan.quantized()) == set(SHAPES) - {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}


def test_pinned_group_size_that_does_not_divide_is_an_error(tmp_path):
    recipe = load_recipe(write(tmp_path, "default: int4g128\n"))
    with pytest.raises(NanoqError, match=r"recipe recipe: model\.layers\.0\.self_attn\.q_proj\.weight: group size 128 "
                                         r"does not divide input dim 576 \(choose group size 64 or 32\)"):
        resolve_plan(recipe, ARCH, SHAPES)
    fallback = load_recipe(write(tmp_path, "default: int4g128\ngroup_size_fallback: true\n"))
    assert resolve_plan(fallback, ARCH, SHAPES).modules["model.layers.0.self_attn.q_proj"].scheme.group_size == 64


def test_unknown_scheme_names_file_and_rule(tmp_path):
    path = write(tmp_path, "default: int4g128\nrules:\n  - 'mlp': int5g128\n")
    with pytest.raises(NanoqError, match=re.escape(f"{path}: rule 1 ('mlp'): unknown scheme 'int5g128'") + ".*valid: float"):
        load_recipe(str(path))


@pytest.mark.parametrize("text, message", [
    ("default: int4g128\nbogus: 1\n", r"unknown recipe keys \['bogus'\]"),
    ("rules: []\n", "missing 'default' scheme"),
    ("default: int4g128\nmethod: squeezellm\n", "method 'squeezellm' is not available"),
    ("default: int4g128\nrules:\n  - '(': int8\n", r"invalid regex '\('"),
    ("- a\n- b\n", "a recipe is a YAML mapping"),
    ("default: [\n", "not valid YAML"),
])
def test_bad_recipe_files(tmp_path, text, message):
    with pytest.raises(NanoqError, match=message):
        load_recipe(str(write(tmp_path, text)))


def test_unknown_recipe_name():
    with pytest.raises(NanoqError, match=r"recipe 'w5' is neither a preset \(w8, .*\) nor a file"):
        load_recipe("w5")


def test_fused_modules_must_share_a_scheme(tmp_path):
    recipe = load_recipe(write(tmp_path, "default: int4g64\nrules:\n  - 'k_proj': int8\n"))
    with pytest.raises(NanoqError, match=r"q_proj, .*k_proj, .*v_proj are fused .* must share one scheme"):
        resolve_plan(recipe, ARCH, SHAPES)


def test_recipe_round_trips_to_provenance_dict():
    assert load_recipe("w4g128").to_dict() == {
        "name": "w4g128", "method": "rtn", "default": "int4g128", "group_size_fallback": True, "rules": [],
        "embeddings": "float", "lm_head": "float", "nvfp4_alpha": 1.0}
    assert parse_scheme(load_recipe("w8").default.name).name == "int8"


def test_embedding_and_head_schemes_and_tied_head(tmp_path):
    recipe = load_recipe(write(tmp_path, "default: int4g64\nembeddings: int8\nlm_head: int4g128\n"))
    tables = {"model.embed_tokens": (1000, 256), "lm_head": (1000, 256)}
    untied = resolve_plan(recipe, ARCH, SHAPES, tables, tie_word_embeddings=False)
    assert untied.quantized()["model.embed_tokens"].name == "int8"
    assert untied.quantized()["lm_head"].name == "int4g128" and untied.tied_lm_head is None
    tied = resolve_plan(recipe, ARCH, SHAPES, tables, tie_word_embeddings=True)
    assert "lm_head" not in tied.modules and tied.tied_lm_head == "model.embed_tokens"
    float_tables = resolve_plan(load_recipe("w4g128"), ARCH, SHAPES, tables, tie_word_embeddings=True)
    assert float_tables.tied_lm_head is None and "model.embed_tokens" not in float_tables.quantized()


def test_qkv_fp16_preset_keeps_attention_inputs_float_and_tables_int8():
    plan = resolve_plan(load_recipe("qkv-fp16"), ARCH, SHAPES, {"model.embed_tokens": (1000, 256)}, True)
    quantized = plan.quantized()
    assert not any(m.endswith(("q_proj", "k_proj", "v_proj")) for m in quantized)
    assert quantized["model.layers.0.mlp.down_proj"].name.startswith("int4g")
    assert quantized["model.embed_tokens"].name == "int8" and plan.tied_lm_head == "model.embed_tokens"


def test_embedding_scheme_must_fit_the_hidden_size(tmp_path):
    recipe = load_recipe(write(tmp_path, "default: int4g64\nembeddings: int4g128\n"))
    with pytest.raises(NanoqError, match=r"model.embed_tokens.weight: group size 128 does not divide input dim 96"):
        resolve_plan(recipe, ARCH, SHAPES, {"model.embed_tokens": (1000, 96)})


def test_nvfp4_and_codebook_rules():
    from nanoq_plugin.quantizers.architectures import architecture_for
    from nanoq_plugin.quantizers.recipe import resolve_plan

    arch = architecture_for({"model_type": "llama"}, "config.json")
    shapes = {"model.layers.0.self_attn.q_proj": (96, 96)}
    with pytest.raises(NanoqError, match="nvfp4 is quantized by rtn only"):
        resolve_plan(load_recipe("nvfp4").with_method("gptq"), arch, shapes)
    with pytest.raises(NanoqError, match="embeddings: cb3g128 is for linears"):
        from dataclasses import replace
        resolve_plan(replace(load_recipe("w4g128"), embeddings=load_recipe("cb3g128").default), arch, shapes,
                     {"model.embed_tokens": (320, 96)})
    plan = resolve_plan(load_recipe("cb3g128"), arch, shapes)
    assert plan.modules["model.layers.0.self_attn.q_proj"].scheme.name == "cb3g32"  # 96: group-size fallback
