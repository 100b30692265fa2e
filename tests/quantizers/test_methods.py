"""Methods as strategies: a method registered from outside the package is offered by the recipe and the command
line, and the pipeline calls it with each group of linears sharing an input (with the statistics of their captured inputs) and
stores exactly what it returns, folding the input scales it asks for into the groups' producers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nanoq_plugin.cli import build_parser
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.quantizers.architectures import architecture_for
from nanoq_plugin.quantizers.block_runner import BlockRunner
from nanoq_plugin.quantizers.methods import (GroupResult, LinearGroup, QuantMethod, calibrated_method_names,
                                             get_method, method_names, register_method, unregister_method)
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe, resolve_plan
from nanoq_plugin.quantizers.rtn import quantize_rtn

BLOCK_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
PRODUCERS = ("input_layernorm", None, "post_attention_layernorm", "mlp.up_proj")


class Recorder(QuantMethod):
    """Plain min-max RTN of each planned linear (what `rtn` stores for int4), recording every group it gets."""

    name = "test-recorder"
    calls: list[tuple] = []

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        inputs = None if group.statistics is None else (group.statistics.samples, *group.hessian.shape)
        type(self).calls.append((group.modules, group.producer, inputs, tuple(group.planned)))
        return GroupResult({m: quantize_rtn(group.weights[m], entry.scheme) for m, entry in group.planned.items()})


class DataFreeRecorder(Recorder):
    name = "test-data-free"
    needs_calibration = False
    calls: list[tuple] = []


class Doubler(QuantMethod):
    """Asks for every group's inputs halved (a scale of 2 folded into the producer) and stores RTN of 2 W."""

    name = "test-doubler"
    folds_scales = True

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        if group.producer is None:
            return GroupResult({m: quantize_rtn(group.weights[m], e.scheme) for m, e in group.planned.items()})
        scale = torch.full((group.weights[group.modules[0]].shape[1],), 2.0)
        scaled = {m: group.weights[m] * scale for m in group.planned}
        return GroupResult({m: quantize_rtn(scaled[m], e.scheme) for m, e in group.planned.items()},
                           references=scaled, input_scale=scale)


@pytest.fixture
def registered():
    """Register the test methods for one test (calls cleared), and remove them after."""
    for cls in (Recorder, DataFreeRecorder, Doubler):
        cls.calls = []
        register_method(cls)
    yield
    for cls in (Recorder, DataFreeRecorder, Doubler):
        unregister_method(cls.name)


def quantize(source, out, method, wikitext=None):
    recipe = load_recipe("w4g128").with_method(method)
    return quantize_checkpoint(source, out, recipe, progress=False, calibration=None if wikitext is None else str(wikitext),
                               calib_windows=3, calib_seq_len=16)


def test_registry_decides_the_methods_offered(registered):
    assert method_names()[:4] == ("rtn", "gptq", "awq", "awq-gptq")
    assert "test-recorder" in calibrated_method_names() and "test-data-free" not in calibrated_method_names()
    assert load_recipe("w4g128").with_method("test-recorder").method == "test-recorder"
    assert build_parser().parse_args(["quantize", "a", "b", "--recipe", "w8", "--method", "test-recorder"]).method \
        == "test-recorder"
    with pytest.raises(NanoqError, match=r"method 'nope' is not available \(available: rtn, gptq, awq, awq-gptq, "):
        get_method("nope")
    with pytest.raises(NanoqError, match="method 'test-recorder' is registered already"):
        register_method(Recorder)


def test_a_method_refuses_the_scheme_kinds_it_does_not_declare(registered):
    arch = architecture_for({"model_type": "llama"}, "config.json")
    shapes = {"model.layers.0.self_attn.q_proj": (96, 96)}
    recipe = load_recipe("nvfp4")

    class Picky(Recorder):
        name = "test-picky"
        kinds = (load_recipe("w4g128").default.kind,)

    register_method(Picky)
    try:
        with pytest.raises(NanoqError, match=r"nvfp4 is quantized by rtn or test-recorder or test-data-free or "
                                             r"test-doubler only \(got method test-picky\)"):
            resolve_plan(recipe.with_method("test-picky"), arch, shapes)
    finally:
        unregister_method("test-picky")


def test_the_walk_calls_a_registered_method_with_each_group_and_its_inputs(registered, tiny_llama_with_tokenizer,
                                                                          tmp_path, wikitext):
    source = tiny_llama_with_tokenizer
    result = quantize(source, tmp_path / "recorded", "test-recorder", wikitext)
    expected = []
    for index in range(2):
        for group, producer in zip(BLOCK_GROUPS, PRODUCERS):
            modules = tuple(f"model.layers.{index}.{name}" for name in group)
            in_features = 256 if group == ("mlp.down_proj",) else 96
            expected.append((modules, None if producer is None else f"model.layers.{index}.{producer}",
                             (3 * 16, in_features, in_features), modules))
    assert Recorder.calls == expected
    assert result.manifest["provenance"]["recipe"]["method"] == "test-recorder"
    assert result.manifest["provenance"]["calibration"]["used"]

    # what the method returned is what was stored: plain RTN on unchanged weights, as `rtn` stores it
    quantize_checkpoint(source, tmp_path / "rtn", load_recipe("w4g128"), progress=False)
    recorded, rtn = (load_file(tmp_path / name / "model.safetensors") for name in ("recorded", "rtn"))
    assert recorded.keys() == rtn.keys()
    assert all(torch.equal(recorded[name], rtn[name]) for name in rtn)


def test_a_method_without_calibration_gets_fused_groups_from_the_weights(registered, tiny_llama_with_tokenizer,
                                                                        tmp_path):
    quantize(tiny_llama_with_tokenizer, tmp_path / "data-free", "test-data-free")
    fused = ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),), (("self_attn.o_proj",),),
             (("mlp.gate_proj", "mlp.up_proj"),), (("mlp.down_proj",),))
    expected = [tuple(f"model.layers.{index}.{name}" for name in group[0]) for index in range(2) for group in fused]
    assert sorted(call[0] for call in DataFreeRecorder.calls) == sorted(expected)  # groups in file order
    assert all(call[1] is None and call[2] is None for call in DataFreeRecorder.calls)
    with pytest.raises(NanoqError, match="--tune-steps fits a calibrated block"):
        from nanoq_plugin.quantizers.settings import TuneSettings

        quantize_checkpoint(tiny_llama_with_tokenizer, tmp_path / "tuned", load_recipe("w4g128").with_method(
            "test-data-free"), progress=False, tune=TuneSettings(steps=1))


def test_the_walk_folds_the_input_scale_a_method_returns(registered, tiny_llama_with_tokenizer, tmp_path, wikitext):
    """A scale of 2 on every group with a producer: the norms are halved, up_proj's scales absorb the halving of
    down_proj's inputs, and every doubled linear stores exactly twice RTN's scales."""
    source = tiny_llama_with_tokenizer
    result = quantize(source, tmp_path / "doubled", "test-doubler", wikitext)
    quantize_checkpoint(source, tmp_path / "rtn", load_recipe("w4g128"), progress=False)
    doubled, rtn = (load_file(tmp_path / name / "model.safetensors") for name in ("doubled", "rtn"))
    original = load_file(source / "model.safetensors")
    for index in range(2):
        block = f"model.layers.{index}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(doubled[f"{block}.{norm}.weight"], original[f"{block}.{norm}.weight"] / 2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert torch.equal(doubled[f"{block}.{name}.scales"], rtn[f"{block}.{name}.scales"] * 2), name
            assert torch.equal(doubled[f"{block}.{name}.qweight"], rtn[f"{block}.{name}.qweight"]), name
        for name in ("self_attn.o_proj", "mlp.up_proj"):  # no producer / doubled, then halved by down_proj's fold
            assert torch.equal(doubled[f"{block}.{name}.scales"], rtn[f"{block}.{name}.scales"]), name
    # each module's error is measured against the weight its stored tensors encode: the same as RTN's
    manifest = json.loads((tmp_path / "doubled" / "nano_manifest.json").read_text())
    rtn_manifest = json.loads((tmp_path / "rtn" / "nano_manifest.json").read_text())
    for module, record in manifest["modules"].items():
        assert record["rel_error"] == pytest.approx(rtn_manifest["modules"][module]["rel_error"], rel=1e-5), module
    with pytest.raises(NanoqError, match="--e2e-steps: method test-doubler folds scales into the float weights"):
        from nanoq_plugin.quantizers.settings import ModelTuneSettings

        quantize_checkpoint(source, tmp_path / "e2e", load_recipe("w4g128").with_method("test-doubler"),
                            calibration=str(wikitext), progress=False, e2e=ModelTuneSettings(steps=1))
    assert result.manifest["provenance"]["recipe"]["method"] == "test-doubler"


class Forgetful(QuantMethod):
    """RTN that checks, at each group, that the float32 weights of the block's linears quantized before it are
    gone: the walk runs on their dequantization, and only a method that folds scales reads them again."""

    name = "test-forgetful"
    calls: list[tuple] = []
    earlier: list = []  # (block, module, weak reference to the float32 weight it was handed)

    def quantize_group(self, group: LinearGroup) -> GroupResult:
        import gc
        import weakref

        block = group.modules[0].rsplit(".", 2)[0].split(".")[2]
        gc.collect()
        alive = [module for b, module, weight in self.earlier if b == block and weight() is not None]
        self.calls.append((group.modules, alive))
        self.earlier.extend((block, m, weakref.ref(group.weights[m])) for m in group.planned)
        return GroupResult({m: quantize_rtn(group.weights[m], e.scheme) for m, e in group.planned.items()})


def test_the_walk_lets_go_of_a_quantized_linears_float_weight(tiny_llama_with_tokenizer, tmp_path, wikitext):
    """Without scale folding or tuning, no float32 source weight of a quantized linear outlives its group's
    quantization (at 8B the block's are 0.9 GB beside the dequantized copies the walk runs on)."""
    Forgetful.calls, Forgetful.earlier = [], []
    register_method(Forgetful)
    try:
        quantize(tiny_llama_with_tokenizer, tmp_path / "forgetful", "test-forgetful", wikitext)
    finally:
        unregister_method(Forgetful.name)
    assert len(Forgetful.calls) == 2 * len(BLOCK_GROUPS)
    assert all(not alive for _, alive in Forgetful.calls), Forgetful.calls


def test_a_method_that_returns_a_scale_must_say_it_folds_scales(registered, tiny_llama_with_tokenizer, tmp_path,
                                                                wikitext):
    class Undeclared(Doubler):
        name = "test-undeclared"
        folds_scales = False

    register_method(Undeclared)
    try:
        with pytest.raises(NanoqError, match="test-undeclared returned an input scale .* does not declare folds_scales"):
            quantize(tiny_llama_with_tokenizer, tmp_path / "undeclared", "test-undeclared", wikitext)
    finally:
        unregister_method(Undeclared.name)
    assert not (tmp_path / "undeclared").exists()


@pytest.mark.parametrize("method, dtype, states, linears", [
    ("gptq", torch.bfloat16, torch.bfloat16, torch.bfloat16),  # nothing float changed: linears held as stored
    ("gptq", torch.float32, torch.float32, torch.float32),
    ("awq", torch.bfloat16, torch.bfloat16, torch.float32),  # folds scales into float weights: float32 block
])
def test_the_walk_holds_states_and_linears_as_the_checkpoint_and_method_allow(method, dtype, states, linears, tmp_path,
                                                                               make_tiny_model, smollm2_dir, wikitext,
                                                                               monkeypatch):
    source = make_tiny_model("llama", tmp_path / "model", dtype=dtype, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, source / name)
    seen = []
    walk = BlockRunner.walk

    def spy(self, block, hidden, *args, **kwargs):
        seen.append((hidden.dtype, {m.weight.dtype for m in block.modules() if isinstance(m, torch.nn.Linear)}))
        return walk(self, block, hidden, *args, **kwargs)

    monkeypatch.setattr(BlockRunner, "walk", spy)
    quantize(source, tmp_path / "out", method, wikitext)
    assert seen == [(states, {linears})] * 2
