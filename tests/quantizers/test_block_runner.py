"""The block runner reproduces the full model block by block, both as one forward and as a sublayer walk."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoq_plugin.format.checkpoint import SourceCheckpoint
from nanoq_plugin.quantizers.architectures import architecture_for
from nanoq_plugin.quantizers.block_runner import WALK_GROUPS, BlockRunner


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_forward_and_walk_equal_the_full_model(arch, tmp_path, make_tiny_model):
    source_dir = make_tiny_model(arch, tmp_path / arch, num_layers=3, dtype=torch.float32)
    source = SourceCheckpoint(source_dir)
    architecture = architecture_for(source.config, "config.json")
    ids = torch.randint(0, 320, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)(
            ids, output_hidden_states=True).hidden_states
    runner = BlockRunner(source.config, torch.device("cpu"), batch_size=2)
    hidden = dict(source.items(["model.embed_tokens.weight"]))["model.embed_tokens.weight"][ids]
    seen = []

    def visit(group, inputs):
        seen.append((group, sum(chunk.shape[0] for chunk in inputs)))
        return group == WALK_GROUPS[2]  # a recompute must give the same result

    for index in range(2):  # the last hidden state is after the final norm
        tensors = dict(source.items([n for n in source.keys() if architecture.block_of(n) == index]))
        block = runner.build(index, tensors, architecture.block_prefix)
        forward = runner.forward(block, hidden)
        walked = runner.walk(block, hidden, visit)
        torch.testing.assert_close(forward, states[index + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(walked, states[index + 1], rtol=1e-5, atol=1e-5)
        hidden = walked
    assert seen == [(group, 5) for group in WALK_GROUPS] * 2
