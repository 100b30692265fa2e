"""The written checkpoint: renamed tensors, consistent config, loads in transformers, equals the in-memory
surgery; composes with `nanoq quantize`; bad input is one line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.surgery.apply import PROVENANCE_NAME, write_surgery
from nanoq_plugin.surgery.inmemory import surgered
from nanoq_plugin.surgery.plan import build_layer_map

OPERATIONS = {  # 5-block models
    "drop": dict(drop=[1]),
    "swap": dict(swap=[(2, 3)]),
    "duplicate": dict(duplicate=[0]),
    "drop+swap+duplicate": dict(drop=[4], swap=[(1, 2)], duplicate=[3]),
}


def load(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(params=("llama", "gemma3_text"))  # every family: test_surgery_families.py
def five_blocks(request, tmp_path, make_tiny_model):
    return make_tiny_model(request.param, tmp_path / f"tiny-{request.param}", num_layers=5)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_written_checkpoint_equals_in_memory_surgery(five_blocks, tmp_path, operation):
    layer_map = build_layer_map(5, **OPERATIONS[operation])
    out = write_surgery(five_blocks, tmp_path / "out", layer_map, progress=False)

    source_tensors, written = load_file(five_blocks / "model.safetensors"), load_file(out / "model.safetensors")
    for new, source in enumerate(layer_map.sources):  # every tensor of new block i is source block sources[i]
        for name, tensor in source_tensors.items():
            if name.startswith(f"model.layers.{source}."):
                assert torch.equal(written[name.replace(f"layers.{source}.", f"layers.{new}.", 1)], tensor), name
    assert not any(name.startswith(f"model.layers.{layer_map.num_layers}.") for name in written)
    assert len(written) == len(source_tensors) + (layer_map.num_layers - 5) * sum(
        name.startswith("model.layers.0.") for name in source_tensors)

    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((five_blocks / "config.json").read_text())
    assert config["num_hidden_layers"] == layer_map.num_layers
    if "layer_types" in source_config:
        assert config["layer_types"] == [source_config["layer_types"][s] for s in layer_map.sources]
    assert json.loads((out / PROVENANCE_NAME).read_text())["layer_map"]["sources"] == list(layer_map.sources)

    reloaded, in_memory = load(out), load(five_blocks)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = in_memory(ids).logits
        with surgered(in_memory, layer_map):
            expected = in_memory(ids).logits
            expected_tokens = in_memory.generate(ids[:1], max_new_tokens=12, do_sample=False)
        assert torch.equal(in_memory(ids).logits, before)  # the context restored the model
        assert torch.equal(reloaded(ids).logits, expected)
        assert not torch.equal(expected, before)
        # generation uses the KV cache: a duplicated block needs its own cache slot (layer_idx)
        assert torch.equal(reloaded.generate(ids[:1], max_new_tokens=12, do_sample=False), expected_tokens)


def test_duplicate_blocks_get_their_own_cache_slots(tiny_llama):
    model = load(tiny_llama)
    with surgered(model, build_layer_map(2, duplicate=[1])):
        assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1, 2]
        assert model.model.layers[1].mlp is model.model.layers[2].mlp  # shared weights, not copies
        assert model.config.num_hidden_layers == 3
    assert [block.self_attn.layer_idx for block in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2


def test_cli_surgery_then_quantize_with_a_rule_naming_a_new_index(tmp_path, make_tiny_model, capsys):
    source = make_tiny_model("llama", tmp_path / "src", num_layers=4, dtype=torch.float32)
    surgered_dir = tmp_path / "surgered"
    assert main(["surgery", str(source), str(surgered_dir), "--drop", "1", "--swap", "2:3", "--quiet"]) == 0
    assert "drop1+swap2:3: 4 -> 3 blocks" in capsys.readouterr().out
    recipe = tmp_path / "recipe.yaml"  # block 1 after surgery is source block 3
    recipe.write_text("default: int4g32\nrules:\n  - 'model\\.layers\\.1\\.mlp\\.down_proj$': int8\n")
    nano = tmp_path / "nano"
    assert main(["quantize", str(surgered_dir), str(nano), "--recipe", str(recipe), "--quiet"]) == 0
    modules = json.loads((nano / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.1.mlp.down_proj"] == "int8"
    assert {modules[f"model.layers.{i}.mlp.down_proj"] for i in (0, 2)} == {"int4g32"}
    assert len(modules) == 3 * 7

    dequantized = dequantized_float_model(surgered_dir, nano)
    source_down = load_file(source / "model.safetensors")["model.layers.3.mlp.down_proj.weight"]
    error = (dequantized.model.layers[1].mlp.down_proj.weight - source_down).abs().max()
    assert error <= source_down.abs().max() / 127  # int8 per channel: at most one step of the largest row
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(nano)(ids).logits.argmax(-1), dequantized(ids).logits.argmax(-1))


def run_cli(args, capsys):
    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (["--drop", "2"], "--drop 2: block 2 is out of range (the model has 2 blocks, 0..1)"),
    (["--swap", "0:1", "--drop", "0"], "--swap 0:1: block 0 is already named by --drop 0"),
    ([], "give --drop, --swap or --duplicate"),
    (["--drop", "1", "--text", "x.txt"], "--text goes with --search"),
    (["--drop", "1", "--search", "drop1", "--text", "x.txt"], "--search finds its own operations"),
])
def test_cli_errors_are_one_line(tiny_llama, tmp_path, capsys, args, message):
    status, err = run_cli(["surgery", tiny_llama, tmp_path / "out", *args], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*nanoq-tmp*"))


def test_refuses_a_quantized_source_and_an_unsupported_model(tiny_llama, tmp_path):
    nano = tmp_path / "nano"
    assert main(["quantize", str(tiny_llama), str(nano), "--recipe", "w8", "--quiet"]) == 0
    with pytest.raises(NanoqError, match=r"config.json: already quantized \(quant_method 'nano'\); operate on the float"):
        write_surgery(nano, tmp_path / "out", build_layer_map(2, drop=[0]), progress=False)
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(NanoqError, match=r"config.json: the decoder blocks of GPT2LMHeadModel hold no nn.Linear"):
        write_surgery(tiny_llama, tmp_path / "out", build_layer_map(2, drop=[0]), progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(NanoqError, match=r"already exists and is not empty"):
        write_surgery(tiny_llama, out, build_layer_map(2, drop=[0]), progress=False)
    assert (out / "keep.txt").read_text() == "user data"
