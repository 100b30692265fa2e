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
