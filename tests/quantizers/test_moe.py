"""Mixture-of-experts quantization: every expert of every block quantized per expert, under the name
`save_pretrained` writes, equal to the reference quantization of that very expert (so a permuted, transposed or
gate/up-swapped expert fails), from either source layout (per-expert tensors or fused 3-D tensors)."""

import json

import pytest
import torch
from safetensors import safe_open

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.data_free import quantize_data_free
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import PRESETS, Recipe, Rule
from tiny_models import build_tiny_model

# the per-expert names transformers 5's save_pretrained writes for each family: gate, up, down (written here, not
# read from nanoq, so a wrong mapping in nanoq fails)
SAVED = {"qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
         "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                     "block_sparse_moe.experts.{e}.w2")}
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def _float_experts(source):
    """Per block, per expert: (gate, up, down) float32 weights as transformers itself holds them in memory
    (`gate_up_proj[e]` is gate then up, the order its forward's `chunk(2)` reads)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        half = experts.gate_up_proj.shape[1] // 2
        out.append([(experts.gate_up_proj[e, :half], experts.gate_up_proj[e, half:], experts.down_proj[e])
                    for e in range(experts.gate_up_proj.shape[0])])
    return out


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_sources(request, tmp_path_factory):
    """(family, per-expert source, fused-3-D source) of one tiny random MoE (same weights)."""
    base = tmp_path_factory.mktemp(request.param)
    per_expert = build_tiny_model(request.param, base / "per_expert", dtype=torch.float32)
    fused = build_tiny_model(request.param, base / "fused", dtype=torch.float32, fused_experts=True)
    return request.param, per_expert, fused


def test_rtn_quantizes_every_expert_as_its_own_reference_from_both_layouts(moe_sources, tmp_path):
    family, per_expert, fused = moe_sources
    floats = _float_experts(per_expert)
    outputs = {}
    for name, source in (("per_expert", per_expert), ("fused", fused)):
        result = quantize_checkpoint(source, tmp_path / name, PRESETS["w4g128"], progress=False)
        outputs[name] = _tensors(result.output)
        config = json.loads((result.output / "config.json").read_text())
        modules = config["quantization_config"]["modules"]
        schemes = config["quantization_config"]["schemes"]
        for index, experts in enumerate(floats):
            head = f"model.layers.{index}."
            assert f"{head}{ROUTER[family]}.weight" in outputs[name]  # the router stays float
            assert head + ROUTER[family] not in modules
            assert result.manifest["moe"][str(index)]["num_experts"] == len(experts)
            assert result.manifest["moe"][str(index)]["top_k"] == 2
            for e, weights in enumerate(experts):
                for template, weight in zip(SAVED[family], weights):
                    module = head + template.format(e=e)
                    assert module in modules, f"{module} left float"
                    scheme = parse_scheme(schemes[modules[module]]["name"]) if isinstance(
                        schemes[modules[module]], dict) and "name" in schemes[modules[module]] else None
                    scheme = scheme or parse_scheme(modules[module])
                    stored = {part.rpartition(".")[2]: t for part, t in outputs[name].items()
                              if part.rpartition(".")[0] == module}
                    assert f"{module}.weight" not in outputs[name]
                    got = dequantize(stored, scheme, *weight.shape)
                    expected = dequantize(quantize_data_free(weight.detach(), scheme), scheme, *weight.shape)
                    assert torch.equal(got, expected), module
    # the fused-3-D source gives the very same checkpoint tensors as the per-expert one
    assert outputs["fused"].keys() == outputs["per_expert"].keys()
    for key, value in outputs["per_expert"].items():
        assert torch.equal(outputs["fused"][key], value), key


def test_one_scheme_per_expert_role_and_routers_stay_float(moe_sources, tmp_path):
    family, per_expert, _ = moe_sources
    split = Recipe("split", parse_scheme("int4g32"), rules=(Rule(r"experts\.3\.", parse_scheme("int8")),))
    with pytest.raises(NanoqError, match="share one scheme per role"):
        quantize_checkpoint(per_expert, tmp_path / "split", split, progress=False)
    router = Recipe("router", parse_scheme("int4g32"), rules=(Rule(r"\.gate$", parse_scheme("int8")),))
    with pytest.raises(NanoqError, match="routing gate"):
        quantize_checkpoint(per_expert, tmp_path / "router", router, progress=False)
    # a rule for all experts of a role is one scheme per role: down in int8, gate/up by default
    down = Recipe("down", parse_scheme("int4g32"), rules=(Rule(SAVED[family][2].split("{e}")[1].replace(".", r"\.")
                                                                + "$", parse_scheme("int8")),))
    result = quantize_checkpoint(per_expert, tmp_path / "down", down, progress=False)
    assert result.manifest["moe"]["0"]["schemes"] == {"gate_up_proj": "int4g32", "down_proj": "int8"}
