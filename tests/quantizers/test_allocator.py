"""The bit allocator: sensitivity per unit, a greedy knapsack that meets the budget, fused groups kept in one
scheme, decisions in the manifest, and the quality gate."""

import json

import pytest
import torch

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.allocator import Unit, allocate
from nanoq_plugin.quantizers.pipeline import AllocationRequest, quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe


def test_greedy_allocation_spends_the_budget_where_it_buys_most():
    units = [Unit(("a",), 100, errors={"s": 10.0, "m": 1.0, "l": 0.9}, bytes={"s": 10, "m": 20, "l": 40}),
             Unit(("b",), 100, errors={"s": 2.0, "m": 1.5, "l": 1.4}, bytes={"s": 10, "m": 20, "l": 40})]
    assert allocate(units, 20) == ["s", "s"]
    assert allocate(units, 30) == ["m", "s"]  # a gains 9 for 10 bytes, b only 0.5
    assert allocate(units, 40) == ["m", "m"]
    assert allocate(units, 1000) == ["l", "l"]
    with pytest.raises(NanoqError, match="below what the smallest candidate gives"):
        allocate(units, 19)


def test_allocator_meets_the_target_and_records_decisions(tiny_llama_with_tokenizer, tmp_path, wikitext):
    candidates = tuple(parse_scheme(n) for n in ("int2g32", "int4g32", "int8"))
    bits = {}
    for target in (3.0, 5.0):
        out = tmp_path / f"alloc-{target}"
        result = quantize_checkpoint(tiny_llama_with_tokenizer, out, load_recipe("w4g128"), calibration=str(wikitext),
                                     progress=False, calib_seq_len=64,
                                     allocation=AllocationRequest(candidates, target_bpw=target, windows=4))
        record = result.manifest["provenance"]["allocation"]
        assert record["achieved_bits_per_weight"] <= target
        assert result.manifest["totals"]["quantized_bits_per_weight"] == pytest.approx(
            record["achieved_bits_per_weight"], abs=1e-3)
        assert len(record["units"]) == 2 * 4  # qkv, o, gate/up, down per block
        for unit in record["units"]:
            assert set(unit["errors"]) == {"int2g32", "int4g32", "int8"}
            assert unit["errors"]["int2g32"] > unit["errors"]["int4g32"] > unit["errors"]["int8"] >= 0
        schemes = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
        for index in range(2):
            qkv = {schemes[f"model.layers.{index}.self_attn.{p}_proj"] for p in "qkv"}
            assert len(qkv) == 1  # a fused group keeps one scheme
        bits[target] = record["achieved_bits_per_weight"]
    assert bits[3.0] < bits[5.0]


def test_quality_gate_refuses_and_writes_nothing(tiny_llama_with_tokenizer, tmp_path, wikitext, capsys):
    code = main(["quantize", str(tiny_llama_with_tokenizer), str(tmp_path / "out"), "--recipe", "w4g128",
                 "--calib", str(wikitext), "--target-bpw", "2.6", "--candidates", "int2g32,int8",
                 "--sensitivity-windows", "4", "--calib-seq-len", "64", "--max-ppl-ratio", "1.0001", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nanoq: error: quality gate: perplexity ratio") and "nothing written" in err
    assert not (tmp_path / "out").exists()


def test_quality_gate_passes_and_is_recorded(tiny_llama_with_tokenizer, tmp_path, wikitext):
    out = tmp_path / "w8"
    assert main(["quantize", str(tiny_llama_with_tokenizer), str(out), "--recipe", "w8", "--calib", str(wikitext),
                 "--calib-seq-len", "64", "--max-ppl-ratio", "1.05", "--quiet"]) == 0
    gate = json.loads((out / "nano_manifest.json").read_text())["provenance"]["quality_gate"]
    assert gate["ppl_ratio"] <= 1.05 and gate["windows"] == 16


def test_block_fisher_weights_are_the_full_model_gradients(make_tiny_model, tmp_path):
    """The block-by-block backward pass gives the gradient the whole model's autograd gives at every block."""
    from transformers import AutoModelForCausalLM

    from nanoq_plugin.format.checkpoint import SourceCheckpoint
    from nanoq_plugin.quantizers.block_runner import BlockRunner
    from nanoq_plugin.quantizers.loss_weights import head_loss_gradient, residual_fisher

    directory = make_tiny_model("llama", tmp_path / "m", num_layers=3, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(0))
    outputs = []

    def keep(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        output.retain_grad()
        outputs.append(output)

    for layer in model.model.layers:
        layer.register_forward_hook(keep)
    model(ids, labels=ids).loss.backward()
    expected = [o.grad.pow(2).mean().item() for o in outputs]

    source = SourceCheckpoint(directory)
    runner = BlockRunner(source.config, torch.device("cpu"), batch_size=2)
    tensors = dict(source.items(source.keys()))
    hidden, inputs = tensors["model.embed_tokens.weight"][ids], []
    for index in range(3):
        inputs.append(hidden)
        hidden = runner.forward(runner.build(index, tensors, "model.layers"), hidden)
    gradient = head_loss_gradient(hidden, ids, runner.final_norm(tensors["model.norm.weight"]),
                                  tensors["lm_head.weight"])
    fisher = residual_fisher(runner, lambda i: runner.build(i, tensors, "model.layers"), inputs, gradient)
    assert fisher == pytest.approx(expected, rel=1e-4)
    assert fisher[0] != pytest.approx(fisher[2], rel=0.05)  # the weights do tell blocks apart


def test_allocation_records_the_block_weights(tiny_llama_with_tokenizer, tmp_path, wikitext):
    candidates = tuple(parse_scheme(n) for n in ("int2g32", "int8"))
    result = quantize_checkpoint(tiny_llama_with_tokenizer, tmp_path / "out", load_recipe("w4g128"),
                                 calibration=str(wikitext), progress=False, calib_seq_len=64,
                                 allocation=AllocationRequest(candidates, target_bpw=5.0, windows=4))
    record = result.manifest["provenance"]["allocation"]
    assert record["fisher_windows"] == 4 and len(record["block_fisher"]) == 2
    assert all(weight > 0 for weight in record["block_fisher"])
