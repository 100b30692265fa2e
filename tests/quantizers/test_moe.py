"""Mixture-of-experts quantization: every expert of every block quantized per expert, under the name
`save_pretrained` writes, equal to the reference quantization of that very expert (so a permuted, transposed or
gate/up-swapped expert fails), from either source layout (per-expert tensors or fused 3-D tensors)."""

import json

import pytest
import torch
from safetensors import safe_open

from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import FLOAT, parse_scheme
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


def _dequantized_float_checkpoint(nano_dir, target):
    """A float checkpoint (per-expert saved names, transformers loads it itself) whose every quantized module is
    its nano tensors dequantized by the format's reference."""
    from safetensors.torch import save_file

    config = json.loads((nano_dir / "config.json").read_text())
    quant = config.pop("quantization_config")
    tensors = _tensors(nano_dir)
    manifest = json.loads((nano_dir / "nano_manifest.json").read_text())
    out = {}
    for module, scheme_name in quant["modules"].items():
        parts = {name.rpartition(".")[2]: tensors.pop(name) for name in list(tensors)
                 if name.rpartition(".")[0] == module}
        out[f"{module}.weight"] = dequantize(parts, parse_scheme(scheme_name), *manifest["modules"][module]["shape"])
    out.update(tensors)
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in out.items()}, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _top_k_sets(model, ids, k):
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    return [torch.topk(layer, k, dim=-1).indices.sort(dim=-1).values for layer in logits]


# w4g128 on the experts, attention kept float: in a tiny random model int4 attention alone moves the routers'
# inputs enough to flip 8-17 % of the top-2 choices (random weights route by near ties); the experts' own
# quantization, which is what this file guards, keeps them (measured 97-99 %)
RECIPES = {"w8": PRESETS["w8"],
           "w4g128-experts": Recipe("w4g128-experts", parse_scheme("int4g128"), rules=(Rule("self_attn", FLOAT),),
                                    group_size_fallback=True)}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_dequantized_model_routes_as_the_float_model(moe_sources, tmp_path, recipe):
    from transformers import AutoModelForCausalLM

    family, per_expert, _ = moe_sources
    result = quantize_checkpoint(per_expert, tmp_path / "nano", RECIPES[recipe], progress=False)
    restored = _dequantized_float_checkpoint(result.output, tmp_path / "restored")
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    float_sets = _top_k_sets(AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32), ids, 2)
    quant_sets = _top_k_sets(AutoModelForCausalLM.from_pretrained(restored, dtype=torch.float32), ids, 2)
    same = torch.stack([(a == b).all(dim=-1) for a, b in zip(float_sets, quant_sets)]).float().mean().item()
    assert same >= 0.95, f"{family} {recipe}: routing agreement {same:.3f}"


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory, wikitext):
    """The first 40 kB of WikiText-2 (tokenizing the whole file costs more than these tests' quantization)."""
    path = tmp_path_factory.mktemp("calib") / "wiki.txt"
    path.write_text(wikitext.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def calibrated_sources(request, tmp_path_factory, smollm2_dir):
    """(family, per-expert source, fused-3-D source) of a one-block tiny MoE with a real tokenizer (same weights),
    whose router is perturbed so that experts 6 and 7 get few tokens (their logits are zero: they win only where
    most others are negative)."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp(request.param)
    sources = []
    for layout, router in (("per_expert", ROUTER[request.param]), ("fused", "mlp.gate")):  # fused: in-memory names
        source = build_tiny_model(request.param, base / layout, num_layers=1, dtype=torch.float32, vocab_size=49152,
                                  fused_experts=layout == "fused")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_dir / name, source / name)
        tensors = _tensors(source)
        tensors[f"model.layers.0.{router}.weight"][6:] = 0
        save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
        sources.append(source)
    return request.param, *sources


def test_gptq_calibrates_each_expert_on_its_routed_tokens_with_a_floor(calibrated_sources, tmp_path, calib_text):
    """With the floor, the starved experts are calibrated on all tokens; without it (from the fused-3-D source,
    which must give the very same tensors) on their few routed tokens: exactly the floored experts differ."""
    from nanoq_plugin.quantizers.settings import GptqSettings

    family, source, fused = calibrated_sources
    recipe = PRESETS["w4g128"].with_method("gptq")
    runs = {}
    for floor, layout in ((32, source), (0, fused)):
        result = quantize_checkpoint(layout, tmp_path / f"floor{floor}", recipe, calibration=str(calib_text),
                                     progress=False, calib_windows=8, calib_seq_len=32,
                                     gptq=GptqSettings(clip_search=False, moe_floor_tokens=floor))
        runs[floor] = (result.manifest["moe"]["0"], _tensors(result.output))
    record = runs[32][0]
    counts = record["routed_tokens"]
    assert sum(counts) == 8 * 32 * 2 and len(counts) == 8  # every token to its top 2, as the router chose
    assert record["floor"] == [e for e, n in enumerate(counts) if n < 32] and record["floor_tokens"] == 32
    assert {6, 7} & set(record["floor"]), counts  # the perturbed router starves them
    assert runs[0][0]["floor"] == [] and runs[0][0]["routed_tokens"] == counts
    floats = _float_experts(source)[0]
    config = json.loads((tmp_path / "floor32" / "config.json").read_text())["quantization_config"]["modules"]
    for e, weights in enumerate(floats):
        modules = ["model.layers.0." + template.format(e=e) for template in SAVED[family]]
        # calibrated on all tokens (the floor) or on its routed tokens alone: the same tokens without the floor
        for module in modules:
            same = all(torch.equal(runs[32][1][name], runs[0][1][name]) for name in runs[0][1]
                       if name.rpartition(".")[0] == module)
            assert same == (e not in record["floor"]), (module, counts)
        # every expert quantized, and its own weight (not a neighbour's, nor gate for up)
        restored = []
        for module, weight in zip(modules, weights):
            parts = {n.rpartition(".")[2]: t for n, t in runs[32][1].items() if n.rpartition(".")[0] == module}
            restored.append(dequantize(parts, parse_scheme(config[module]), *weight.shape))
        gate, up, down = weights
        errors = [torch.linalg.norm(r - w) / torch.linalg.norm(w) for r, w in zip(restored, weights)]
        assert max(errors) < 0.3, (e, errors)
        assert torch.linalg.norm(restored[0] - up) / torch.linalg.norm(up) > 2 * max(errors)
        other = floats[(e + 1) % 8][2]
        assert torch.linalg.norm(restored[2] - other) / torch.linalg.norm(other) > 2 * max(errors)


def test_shared_experts_are_linears_and_their_gate_stays_float(tmp_path):
    source = build_tiny_model("qwen2_moe", tmp_path / "src", num_layers=1, dtype=torch.float32)
    result = quantize_checkpoint(source, tmp_path / "out", PRESETS["w4g128"], progress=False)
    modules = json.loads((result.output / "config.json").read_text())["quantization_config"]["modules"]
    head = "model.layers.0.mlp."
    assert {f"{head}shared_expert.{p}_proj" for p in ("gate", "up", "down")} <= set(modules)
    assert len([m for m in modules if ".experts." in m]) == 8 * 3
    assert f"{head}shared_expert_gate" not in modules and f"{head}gate" not in modules
    assert f"{head}shared_expert_gate.weight" in _tensors(result.output)
    named = Recipe("gate", parse_scheme("int4g32"), rules=(Rule("shared_expert_gate", parse_scheme("int8")),))
    with pytest.raises(NanoqError, match=r"routing gate model\.layers\.0\.mlp\.shared_expert_gate \(int8\)"):
        quantize_checkpoint(source, tmp_path / "named", named, progress=False)


def test_awq_with_codebooks_quantizes_every_expert(calibrated_sources, tmp_path, calib_text):
    """AWQ (no scale folded into experts: their input's norm is shared by all of them and the router) on codebook
    schemes: every expert quantized near its own weight, routing recorded."""
    family, source, _ = calibrated_sources
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the method: the expert walk is the GPTQ test's")
    result = quantize_checkpoint(source, tmp_path / "awq", PRESETS["cb4g128"].with_method("awq"),
                                 calibration=str(calib_text), progress=False, calib_windows=8, calib_seq_len=32)
    modules = result.manifest["modules"]
    experts = [m for m in modules if ".experts." in m]
    assert len(experts) == 8 * 3 and all(modules[m]["scheme"].startswith("cb4") for m in experts)
    assert max(modules[m]["rel_error"] for m in experts) < 0.15
    assert sum(result.manifest["moe"]["0"]["routed_tokens"]) == 8 * 32 * 2


def test_block_and_end_to_end_tuning_refuse_experts_in_one_line(moe_sources, tmp_path, wikitext):
    from nanoq_plugin.quantizers.settings import ModelTuneSettings, TuneSettings

    _, per_expert, _ = moe_sources
    for option, kwargs in (("--tune-steps", {"tune": TuneSettings(steps=2)}),
                           ("--e2e-steps", {"e2e": ModelTuneSettings(steps=2)})):
        with pytest.raises(NanoqError, match=f"^mixture-of-experts models: {option} does not handle experts yet"):
            quantize_checkpoint(per_expert, tmp_path / "out", PRESETS["w4g128"].with_method("gptq"),
                                calibration=str(wikitext), progress=False, **kwargs)
        assert not (tmp_path / "out").exists()


def test_the_allocator_gives_each_expert_role_one_scheme(calibrated_sources, tmp_path, calib_text):
    from nanoq_plugin.quantizers.allocator import AllocationRequest

    family, source, _ = calibrated_sources
    if family != "qwen3_moe":
        pytest.skip("one family is enough: the expert walk is the GPTQ test's")
    allocation = AllocationRequest((parse_scheme("int2g64"), parse_scheme("int4g128"), parse_scheme("int8")),
                                   target_bpw=4.5, windows=8)
    result = quantize_checkpoint(source, tmp_path / "out", PRESETS["w4g128"], calibration=str(calib_text),
                                 progress=False, calib_seq_len=32, allocation=allocation)
    record = result.manifest["provenance"]["allocation"]
    units = {len(unit["modules"]): unit for unit in record["units"]}
    assert 16 in units and 8 in units  # gate/up of all 8 experts, and their 8 downs, are one unit each
    assert all(".experts." in m for m in units[16]["modules"] + units[8]["modules"])
    modules = json.loads((result.output / "config.json").read_text())["quantization_config"]["modules"]
    for unit in (units[16], units[8]):
        chosen = {parse_scheme(modules[m]) for m in unit["modules"]}
        assert len(chosen) == 1 and chosen.pop().bits == parse_scheme(unit["chosen"]).bits
    assert record["achieved_bits_per_weight"] <= 4.5 + 1e-6
    assert set(result.manifest["moe"]["0"]["schemes"].values()) == {modules[units[16]["modules"][0]],
                                                                     modules[units[8]["modules"][0]]}


def test_the_command_line_sets_the_floor(calibrated_sources, tmp_path, calib_text, capsys):
    """`nanoq quantize --moe-floor-tokens N` reaches the walk (the manifest records N and floors the experts
    routed fewer tokens); a negative N is refused in one line before anything is written."""
    from nanoq_plugin.cli import main

    family, source, _ = calibrated_sources
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the option's plumbing")
    def quantize(output, floor):
        return main(["quantize", str(source), str(output), "--recipe", "w4g128", "--method", "gptq", "--calib",
                     str(calib_text), "--calib-windows", "8", "--calib-seq-len", "32", "--moe-floor-tokens", floor])

    assert quantize(tmp_path / "out", "100000") == 0
    record = json.loads((tmp_path / "out" / "nano_manifest.json").read_text())["moe"]["0"]
    assert record["floor_tokens"] == 100000 and record["floor"] == list(range(8))  # every expert below it
    capsys.readouterr()
    assert quantize(tmp_path / "bad", "-1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nanoq: error: ") and "--moe-floor-tokens" in err, err
    assert not (tmp_path / "bad").exists()
