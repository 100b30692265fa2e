"""benchmarks/scale.py on a tiny shape: a streamed multi-shard source, quantized (RTN, GPTQ on the first blocks, extrapolated from its per-block times)
into multi-shard outputs with an index, equal to quantizing the same weights from one file into one file."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoq_plugin.format.checkpoint import INDEX_NAME, SourceCheckpoint
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"The river {i} runs to the sea, and the quick brown fox jumps over {i + 7} lazy dogs."
                for i in range(60))


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    directory = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def test_scale_script_on_a_tiny_shape(scale, tokenizer_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    report = scale.main(["--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                         "--vocab", "320", "--layers", "3", "--gptq-blocks", "2", "--extrapolate-layers", "5",
                         "--calib", str(calib),
                         "--calib-windows", "4", "--calib-seq-len", "32", "--max-shard-mb", "0.03",
                         "--tokenizer", str(tokenizer_dir), "--work", str(tmp_path / "work"), "--keep-outputs",
                         "--out", str(tmp_path / "scale.json")])
    assert json.loads((tmp_path / "scale.json").read_text()) == report
    assert report["provenance"]["commit"] is not None or report["provenance"]["cpu"]
    source = Path(report["source"]["directory"])
    assert report["source"]["shards"] == 3 + 2 and (source / INDEX_NAME).is_file()
    index = json.loads((source / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == report["shape"]["params"] * 2
    assert len(set(index["weight_map"].values())) == 5

    rtn, gptq_two, gptq = report["runs"]
    assert (rtn["method"], rtn["blocks_run"], gptq_two["blocks_run"]) == ("rtn", 3, 2)
    for run in (rtn, gptq_two):
        assert run["output_shards"] >= 2 and run["output_index"], run
        assert run["peak_rss_bytes"] > run["peak_rss_after_imports_bytes"] > 0
        assert "largest_map_bytes" in run and run["seconds"] > 0
        assert len(run["block_seconds"]) == run["blocks_run"] and sum(run["block_seconds"]) < run["seconds"]
    assert gptq["extrapolated"] and gptq["blocks_measured"] == [2] and "not measured" in gptq["note"]
    assert report["extrapolated_to_layers"] == 5 and "(5 blocks)" in gptq["note"]
    assert gptq["per_block_seconds"] == pytest.approx(sum(gptq_two["block_seconds"]) / 2, abs=0.01)
    assert gptq["seconds"] == pytest.approx(gptq["outside_blocks_seconds"] + 5 * gptq["per_block_seconds"], abs=0.1)
    assert report["budget"]["total_bytes"] == 2 * report["shape"]["block_bytes"] + int(0.03 * 2**20) + 320 * 64 * 2

    # the multi-shard output of the multi-shard source equals one file quantized from one file
    sharded = load_nano_checkpoint(rtn["output"])
    whole_source = tmp_path / "one-file-source"
    whole_source.mkdir()
    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    save_file(tensors, whole_source / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (whole_source / name).write_bytes((source / name).read_bytes())
    single = quantize_checkpoint(whole_source, tmp_path / "one-file-out", load_recipe("w4g128"), progress=False)
    assert list(single.output.glob("*.safetensors")) == [single.output / "model.safetensors"]
    one_file = SourceCheckpoint(single.output)
    assert sharded.tensors.keys() == one_file.keys()
    for name in one_file.keys():
        assert torch.equal(sharded.tensors.get(name), one_file.get(name)), name
    assert sharded.manifest["modules"] == single.manifest["modules"]


def test_the_first_blocks_view_links_the_source_shards(scale, tokenizer_dir, tmp_path):
    shape = scale.Shape(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=320, layers=3)
    made = scale.generate_source(tmp_path / "src", shape, tokenizer_dir)
    assert not made["reused"] and scale.generate_source(tmp_path / "src", shape, tokenizer_dir)["reused"]
    view = scale.first_blocks_view(tmp_path / "src", shape, 1, tmp_path / "view")
    checkpoint = SourceCheckpoint(view)
    assert checkpoint.config["num_hidden_layers"] == 1
    assert {name.split(".")[2] for name in checkpoint.keys() if name.startswith("model.layers.")} == {"0"}
    assert torch.equal(checkpoint.get("lm_head.weight"), SourceCheckpoint(tmp_path / "src").get("lm_head.weight"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    assert model.model.layers[2].mlp.down_proj.weight.shape == (64, 128)
    assert float(model.model.layers[2].mlp.down_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


def test_largest_allocation_is_the_largest_anonymous_read_write_map(scale, tmp_path):
    log = tmp_path / "strace.log"
    log.write_text(
        "7  mmap(NULL, 1048576, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000\n"
        "7  mmap(NULL, 134217728, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, -1, 0) = 0x7f1000000000\n"
        "8  mmap(NULL, 8392704, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_STACK, -1, 0) = 0x7f2000000000\n"
        "7  mmap(NULL, 999999999, PROT_READ|PROT_WRITE, MAP_SHARED, 3, 0) = 0x7f3000000000\n"
        "7  mremap(0x7f0000000000, 1048576, 2097152, MREMAP_MAYMOVE) = 0x7f4000000000\n"
        "7  mmap(NULL, 4000000000, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = -1 ENOMEM (no memory)\n")
    assert scale.largest_anonymous_map(log) == 2097152
    log.write_text("7  mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, 3, 0) = 0x7f0000000000\n")
    assert scale.largest_anonymous_map(log) is None
