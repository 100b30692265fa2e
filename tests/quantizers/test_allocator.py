"""The bit allocator: sensitivity per unit, a greedy knapsack that meets the budget, fused groups kept in one
scheme, decisions in the manifest, and the quality gate."""

import json

import pytest
import torch

from nanoq_plugin.cli import main
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.allocator import Unit, allocate, stream_energy
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


def test_stream_energy_is_the_median_token_and_scales_the_errors(tiny_llama):
    hidden = torch.ones(2, 8, 4)
    hidden[0, 0] = 1000.0  # a massive-activation token does not set the energy
    assert stream_energy(hidden) == pytest.approx(1.0)
    assert stream_energy(3 * hidden) == pytest.approx(9.0)

    # the same rounding error counts 1/energy: a quiet stream makes a block's errors weigh more
    from transformers import AutoModelForCausalLM

    from nanoq_plugin.quantizers.allocator import build_units, measure_group
    from nanoq_plugin.quantizers.architectures import SUPPORTED_ARCHITECTURES
    from nanoq_plugin.quantizers.recipe import resolve_plan

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    block = model.model.layers[0]
    arch = SUPPORTED_ARCHITECTURES["llama"]
    shapes = {m: tuple(model.get_submodule(m).weight.shape) for i in range(2) for m in arch.linears_of_block(i)}
    plan = resolve_plan(load_recipe("w4g128"), arch, shapes, {}, False)
    inputs = [torch.randn(2, 16, 96, generator=torch.Generator().manual_seed(0))]
    errors = {}
    for energy in (1.0, 4.0):
        units = build_units(plan, arch, 2, shapes, (parse_scheme("int2g32"), parse_scheme("int8")), "w4g128")
        unit_of = {m: unit for unit in units for m in unit.modules}
        measure_group(unit_of, block, "model.layers.0", ("self_attn.o_proj",), inputs, energy)
        errors[energy] = unit_of["model.layers.0.self_attn.o_proj"].errors["int2g32"]
    assert errors[1.0] == pytest.approx(4 * errors[4.0])
