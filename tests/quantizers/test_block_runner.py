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


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3_moe"])
def test_a_block_holding_its_linears_as_stored_computes_as_the_float32_one(family, tmp_path, make_tiny_model):
    """`stored_linears`: a 16-bit linear's weight is the stored tensor itself (no copy) and is cast to float32 per
    call, so the block's outputs equal the float32 block's bit for bit; every other parameter (norms, fused
    experts) is float32. Hidden states held in bfloat16 between blocks go in and come out in bfloat16."""
    source_dir = make_tiny_model(family, tmp_path / family, num_layers=1, dtype=torch.bfloat16)
    source = SourceCheckpoint(source_dir)
    architecture = architecture_for(source.config, "config.json")
    tensors = dict(source.items([n for n in source.keys() if architecture.block_of(n) == 0]))
    runner = BlockRunner(source.config, torch.device("cpu"), batch_size=2, states_dtype=torch.bfloat16)
    stored = runner.build(0, tensors, architecture.block_prefix, stored_linears=True)
    float32 = runner.build(0, tensors, architecture.block_prefix)
    linears = 0
    for name, parameter in stored.named_parameters():
        module, _, kind = name.rpartition(".")
        if isinstance(stored.get_submodule(module), torch.nn.Linear) and kind == "weight":
            saved = tensors[f"{architecture.block_prefix}.0.{architecture.saved(module)}.weight"]
            assert parameter.dtype == torch.bfloat16 and parameter.data_ptr() == saved.data_ptr(), name
            linears += 1
        else:
            assert parameter.dtype == torch.float32, name
    assert linears >= 4
    assert all(p.dtype == torch.float32 for p in float32.parameters())

    ids = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    hidden = runner.embed(ids, source.get(f"{architecture.embedding}.weight"))
    assert hidden.dtype == torch.bfloat16
    expected = runner.call(float32, hidden)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(runner.call(stored, hidden), expected, rtol=0, atol=0)
    walked = runner.walk(stored, hidden, lambda group, statistics: None, out=hidden)
    assert walked.dtype == torch.bfloat16 and walked.data_ptr() == hidden.data_ptr()
    torch.testing.assert_close(walked, expected.to(torch.bfloat16), rtol=0, atol=0)
