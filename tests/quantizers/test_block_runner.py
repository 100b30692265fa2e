"""The block runner reproduces the full model block by block, both as one forward and as a group-by-group
walk, for every family the suite covers (sliding and full attention layers, Gemma's scaled embeddings and
(1 + w) norms, Granite's multipliers, Phi-3's fused projections, OLMo 2's post-norms)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoq_plugin.format.checkpoint import SourceCheckpoint
from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES, architecture_for
from nanoq_plugin.quantizers.block_runner import BlockRunner


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_forward_and_walk_equal_the_full_model(family, tmp_path, make_tiny_model):
    source_dir = make_tiny_model(family, tmp_path / family, num_layers=3, dtype=torch.float32)
    source = SourceCheckpoint(source_dir)
    architecture = architecture_for(source.config, "config.json")
    ids = torch.randint(3, 320, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)(
            ids, output_hidden_states=True).hidden_states
    runner = BlockRunner(source.config, torch.device("cpu"), batch_size=2)
    hidden = runner.embed(ids, source.get(f"{architecture.embedding}.weight"))
    torch.testing.assert_close(hidden, states[0], rtol=1e-5, atol=1e-5)
    seen = []

    def visit(group, statistics):
        seen.append((group, statistics.samples))

    for index in range(2):  # the last hidden state is after the final norm
        tensors = dict(source.items([n for n in source.keys() if architecture.block_of(n) == index]))
        block = runner.build(index, tensors, architecture.block_prefix)
        forward = runner.forward(block, hidden)
        walked = runner.walk(block, hidden, visit)
        torch.testing.assert_close(forward, states[index + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(walked, states[index + 1], rtol=1e-5, atol=1e-5)
        in_place = runner.walk(block, hidden, visit, out=hidden)  # each batch's output replaces its input
        assert in_place.data_ptr() == hidden.data_ptr()
        torch.testing.assert_close(hidden, walked, rtol=0, atol=0)
    assert seen == [(group.linears, 5 * 24) for group in architecture.groups] * 4


def test_a_group_sees_the_inputs_the_changed_block_gives_it(tmp_path, make_tiny_model):
    """True sequential: what visit does to one group (here: zero q/k/v) changes the next group's inputs."""
    source_dir = make_tiny_model("llama", tmp_path / "llama", dtype=torch.float32)
    source = SourceCheckpoint(source_dir)
    architecture = architecture_for(source.config, "config.json")
    runner = BlockRunner(source.config, torch.device("cpu"))
    block = runner.build(0, dict(source.items([n for n in source.keys() if architecture.block_of(n) == 0])),
                         architecture.block_prefix)
    hidden = torch.randn(2, 8, 96)
    seen = {}

    def visit(group, statistics):
        seen[group] = statistics
        if group[0] == "self_attn.v_proj" or "self_attn.v_proj" in group:
            block.get_submodule("self_attn.v_proj").weight.data.zero_()

    runner.walk(block, hidden, visit)
    assert seen[("self_attn.o_proj",)].hessian.abs().max() == 0  # attention over zero values
    assert seen[("self_attn.o_proj",)].abs_mean.abs().max() == 0
    assert seen[("mlp.down_proj",)].abs_mean.min() > 0
