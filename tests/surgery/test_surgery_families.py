"""Surgery on every tested family and the tiny mixtures of experts: the written checkpoint loads in transformers
with no missing or unexpected tensor, its blocks are renumbered, and its logits equal the source model run with
the dropped block skipped (the reference deletes the block from the loaded model's ModuleList and fixes its
layer_types and every layer_idx by hand); drop + swap + duplicate equals the in-memory surgery, KV-cached
generation included. Sequences are longer than the sliding window (16), so a block given the wrong attention
type changes the logits."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MOE_FAMILIES
from transformers import AutoModelForCausalLM

from nanoq_plugin.cli import main
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES
from nanoq_plugin.surgery.apply import write_surgery
from nanoq_plugin.surgery.inmemory import surgered
from nanoq_plugin.surgery.plan import build_layer_map

S, F = "sliding_attention", "full_attention"
BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load_strictly(directory):
    """The float32 model of `directory`, asserting transformers found every tensor it expects and no other."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def skip_block(model, index: int):
    """`model` run with block `index` skipped: deleted from the ModuleList, its entry removed from layer_types, and
    every later block's layer_idx (its KV-cache slot) moved down by one. Independent of nanoq's surgery code."""
    del model.model.layers[index]
    config = model.config
    config.num_hidden_layers -= 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [kind for i, kind in enumerate(config.layer_types) if i != index]
    for new_index, block in enumerate(model.model.layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return model


def expected_renaming(source_tensors: dict, sources: tuple[int, ...]) -> dict[str, str]:
    """Written name -> source name: tensors outside the blocks as they are, block `sources[i]`'s as block i's."""
    renamed = {name: name for name in source_tensors if not BLOCK.match(name)}
    for new_index, source in enumerate(sources):
        for name in source_tensors:
            match = BLOCK.match(name)
            if match and int(match[1]) == source:
                renamed[f"model.layers.{new_index}.{match[2]}"] = name
    return renamed


def ids(length=24, batch=2, seed=0):
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", [*TESTED_FAMILIES, *MOE_FAMILIES])
def test_family_surgery(family, tmp_path, make_tiny_model):
    source = make_tiny_model(family, tmp_path / "src", num_layers=4, dtype=torch.float32)
    drop = build_layer_map(4, drop=[2])
    dropped = write_surgery(source, tmp_path / "drop2", drop, progress=False)

    source_tensors, written = load_file(source / "model.safetensors"), load_file(dropped / "model.safetensors")
    renaming = expected_renaming(source_tensors, drop.sources)
    assert sorted(written) == sorted(renaming)
    assert all(torch.equal(written[new], source_tensors[old]) for new, old in renaming.items())

    reference = skip_block(load_strictly(source), 2)
    with torch.no_grad():
        expected = reference(ids()).logits
        assert torch.equal(load_strictly(dropped)(ids()).logits, expected)
        assert not torch.equal(load_strictly(source)(ids()).logits, expected)  # block 2 mattered

    # every operation at once, against the in-memory surgery, with KV-cached generation (a duplicated block
    # needs its own cache slot)
    mixed = build_layer_map(4, drop=[3], swap=[(1, 2)], duplicate=[0])
    written_model = load_strictly(write_surgery(source, tmp_path / "mixed", mixed, progress=False))
    in_memory = load_strictly(source)
    with torch.no_grad(), surgered(in_memory, mixed):
        assert torch.equal(written_model(ids()).logits, in_memory(ids()).logits)
        prompt = ids(batch=1, length=12, seed=1)
        assert torch.equal(written_model.generate(prompt, max_new_tokens=12, do_sample=False),
                           in_memory.generate(prompt, max_new_tokens=12, do_sample=False))


def test_gemma3_layer_types_must_be_rewritten(tmp_path, make_tiny_model):
    """Dropping sliding block 2 of [S, F, S, F] must leave [S, F, F]; the same checkpoint with the list merely
    truncated to [S, F, S] computes other logits, so the family test above would catch a surgery that did so."""
    source = make_tiny_model("gemma3_text", tmp_path / "src", num_layers=4, dtype=torch.float32)
    assert json.loads((source / "config.json").read_text())["layer_types"] == [S, F, S, F]
    out = write_surgery(source, tmp_path / "out", build_layer_map(4, drop=[2]), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == [S, F, F] and config["num_hidden_layers"] == 3

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    (truncated / "config.json").write_text(json.dumps({**config, "layer_types": [S, F, S]}))
    reference = skip_block(load_strictly(source), 2)
    with torch.no_grad():
        expected = reference(ids()).logits
        assert torch.equal(load_strictly(out)(ids()).logits, expected)
        assert not torch.allclose(load_strictly(truncated)(ids()).logits, expected, atol=1e-3)


def test_moe_source_with_fused_experts(tmp_path, make_tiny_model):
    """A mixture of experts stored as transformers holds it in memory (`mlp.experts.gate_up_proj [E, 2I, H]`) is
    written one weight per expert, under the new block's name, and loads and computes as the skipped-block model."""
    source = make_tiny_model("qwen3_moe", tmp_path / "src", num_layers=3, dtype=torch.float32, fused_experts=True)
    assert "model.layers.2.mlp.experts.gate_up_proj" in load_file(source / "model.safetensors")
    out = write_surgery(source, tmp_path / "out", build_layer_map(3, drop=[1]), progress=False)
    written = load_file(out / "model.safetensors")
    assert not any(name.startswith("model.layers.2.") for name in written)
    gate_up = load_file(source / "model.safetensors")["model.layers.2.mlp.experts.gate_up_proj"]  # [E, 2I, H]
    intermediate = gate_up.shape[1] // 2
    assert torch.equal(written["model.layers.1.mlp.experts.7.gate_proj.weight"], gate_up[7, :intermediate])
    assert torch.equal(written["model.layers.1.mlp.experts.7.up_proj.weight"], gate_up[7, intermediate:])
    reference = skip_block(load_strictly(source), 1)
    with torch.no_grad():
        assert torch.equal(load_strictly(out)(ids()).logits, reference(ids()).logits)


def test_moe_surgery_then_quantize_with_a_rule_naming_new_experts(tmp_path, make_tiny_model):
    """After dropping block 0 of a Mixtral, block 1 is source block 2: a recipe rule naming block 1's experts'
    down projections (one scheme per role: engines fuse a block's experts) reaches them, and the quantized
    checkpoint's manifest names the new blocks only."""
    source = make_tiny_model("mixtral", tmp_path / "src", num_layers=3, dtype=torch.float32)
    surgered_dir = write_surgery(source, tmp_path / "surgered", build_layer_map(3, drop=[0]), progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: int4g32\nrules:\n  - 'model\\.layers\\.1\\.block_sparse_moe\\.experts\\.\\d+\\.w2$': int8\n")
    nano = tmp_path / "nano"
    assert main(["quantize", str(surgered_dir), str(nano), "--recipe", str(recipe), "--quiet"]) == 0
    modules = json.loads((nano / "config.json").read_text())["quantization_config"]["modules"]
    assert {name for name, scheme in modules.items() if scheme == "int8"} == {
        f"model.layers.1.block_sparse_moe.experts.{e}.w2" for e in range(8)}
    assert len(modules) == 2 * 8 * 3 + 2 * 4 and not any(name.startswith("model.layers.2.") for name in modules)

    dequantized = dequantized_float_model(surgered_dir, nano)
    source_w2 = load_file(source / "model.safetensors")["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    down = dequantized.model.layers[1].mlp.experts.down_proj[3]  # transformers holds the experts fused: [E, H, I]
    assert (down - source_w2).abs().max() <= source_w2.abs().max() / 127  # int8 per channel: within one step
    with torch.no_grad():
        assert torch.equal(load_strictly(nano)(ids()).logits.argmax(-1), dequantized(ids()).logits.argmax(-1))


@pytest.mark.slow
def test_real_gemma3_drop_a_full_attention_block(gemma3_dir, tmp_path):
    """Gemma 3 270M (18 blocks, every sixth full attention, sliding window 512): dropping full-attention block 5
    leaves blocks 0-9 sliding; over 520 tokens the checkpoint computes as the model with block 5 skipped (the
    final hidden states are compared: the head, untouched by surgery, would only add a [520, 262144] product)."""
    out = write_surgery(gemma3_dir, tmp_path / "out", build_layer_map(18, drop=[5]), progress=False)
    source_types = json.loads((gemma3_dir / "config.json").read_text())["layer_types"]
    assert json.loads((out / "config.json").read_text())["layer_types"] == source_types[:5] + source_types[6:]
    prompt = ids(length=520, batch=1)
    with torch.no_grad():
        expected = skip_block(load_strictly(gemma3_dir), 5).model(prompt).last_hidden_state
        assert torch.equal(load_strictly(out).model(prompt).last_hidden_state, expected)
