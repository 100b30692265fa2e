"""End to end on tiny random models of real architectures: quantize with every preset, load with
transformers, and compare with the float model rebuilt from the dequantized weights."""

import json
import subprocess
import sys

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import nanoq_plugin  # noqa: F401  (registers the transformers quantizer)
from nanoq_plugin.engines.transformers import NanoEmbedding, NanoLinear, NanoTiedHead
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

from cpu_expectations import expected_cpu_kernel

PRESETS = ("w8", "w4g128", "w3g128", "w2g64", "nvfp4", "cb3g128")


@pytest.mark.parametrize("preset", PRESETS)
def test_quantize_and_load_with_transformers(tiny_model, tmp_path, preset):
    out = tmp_path / f"nano-{preset}"
    result = quantize_checkpoint(tiny_model, out, load_recipe(preset), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "nano_manifest.json"]
    assert not list(tmp_path.glob(".*nanoq-tmp*"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "nano"
    assert len(config["quantization_config"]["modules"]) == 2 * 7

    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    linears = [m for m in quantized.modules() if isinstance(m, NanoLinear)]
    assert len(linears) == 14 and not any(isinstance(getattr(m, "weight", None), torch.Tensor) for m in linears)
    reference = dequantized_float_model(tiny_model, out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, float_logits = quantized(ids).logits, reference(ids).logits, original(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, float_logits, atol=1e-6)  # it really is the quantized model
    if preset == "w8":
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0)
        assert cosine > 0.999

    # storage accounting matches the bytes in the file
    totals = result.manifest["totals"]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        file_bytes = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert totals["stored_bytes"] == file_bytes
    assert totals["ratio"] == round(totals["original_bytes"] / totals["stored_bytes"], 4)


def test_effective_group_size_in_manifest_and_inspect(tiny_llama, tmp_path, capsys):
    from nanoq_plugin.cli import main

    out = tmp_path / "nano"
    assert main(["quantize", str(tiny_llama), str(out), "--recipe", "w4g128", "--quiet"]) == 0
    modules = json.loads((out / "nano_manifest.json").read_text())["modules"]
    assert modules["model.layers.0.self_attn.q_proj"]["scheme"] == "int4g32"  # hidden 96
    assert modules["model.layers.0.self_attn.q_proj"]["requested_scheme"] == "int4g128"
    assert modules["model.layers.0.mlp.down_proj"]["scheme"] == "int4g128"  # intermediate 256
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    q_row = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj"))
    assert q_row.split()[1:4] == ["int4g32", "int4g128", "32"]
    down_row = next(line for line in lines if line.startswith("model.layers.0.mlp.down_proj"))
    assert down_row.split()[1:4] == ["int4g128", "int4g128", "128"]


def test_sharded_output_round_trips(tiny_llama, tmp_path):
    out = tmp_path / "nano"
    quantize_checkpoint(tiny_llama, out, load_recipe("w4g128"), progress=False, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    single = tmp_path / "single"
    quantize_checkpoint(tiny_llama, single, load_recipe("w4g128"), progress=False)
    a, b = load_nano_checkpoint(out).tensors, load_nano_checkpoint(single).tensors
    assert a.keys() == b.keys() and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def _write_wide_model(directory, num_layers, hidden=512, inter=2048):
    directory.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": num_layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 256, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    for index in range(num_layers):  # one file per block so the test never holds the whole model
        p = f"model.layers.{index}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        block = {p + k + ".weight": torch.randn(s, generator=gen) for k, s in shapes.items()}
        block[p + "input_layernorm.weight"] = torch.ones(hidden)
        block[p + "post_attention_layernorm.weight"] = torch.ones(hidden)  # a complete model: nanoq refuses less
        save_file(block, str(directory / f"block-{index:03d}.safetensors"))
    save_file({"model.embed_tokens.weight": torch.randn(256, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": torch.randn(256, hidden)}, str(directory / "rest.safetensors"))


def _peak_rss_of_quantize(source, out):
    script = ("import resource, sys; from nanoq_plugin.cli import main; rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, "quantize", str(source), str(out), "--recipe", "w4g128",
                           "--quiet", "--max-shard-mb", "16"], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    block_bytes = (4 * 512 * 512 + 3 * 512 * 2048) * 4  # 16 MiB of float32 per block
    _write_wide_model(tmp_path / "few", 2)
    _write_wide_model(tmp_path / "many", 34)
    few = _peak_rss_of_quantize(tmp_path / "few", tmp_path / "few-out")
    many = _peak_rss_of_quantize(tmp_path / "many", tmp_path / "many-out")
    # 32 more blocks = 512 MiB more weights: a pipeline that held them would grow by about that much;
    # allocator noise and the 16 MiB shard buffer move the peak by a few tens of MiB
    assert many - few < 8 * block_bytes, (few / 2**20, many / 2**20)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qkv_fp16_with_int8_embeddings_and_head(tmp_path, tied, make_tiny_model):
    source = make_tiny_model("llama", tmp_path / "src", tie_word_embeddings=tied)
    out = tmp_path / "nano"
    quantize_checkpoint(source, out, load_recipe("qkv-fp16"), progress=False)
    checkpoint = load_nano_checkpoint(out)
    modules = checkpoint.quant_config.modules
    assert modules["model.embed_tokens"].name == "int8"
    assert not any(m.endswith(("q_proj", "k_proj", "v_proj")) for m in modules)
    if tied:
        assert checkpoint.quant_config.tied_lm_head == "model.embed_tokens" and "lm_head" not in modules
        assert "lm_head.weight" not in checkpoint.tensors and "lm_head.qweight" not in checkpoint.tensors
    else:
        assert modules["lm_head"].name == "int8" and checkpoint.quant_config.tied_lm_head is None

    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(quantized.model.embed_tokens, NanoEmbedding)
    assert isinstance(quantized.lm_head, NanoTiedHead if tied else NanoLinear)
    # the int8 table is held once, tied or not; its scales float16 as stored (the reference), in the activation
    # dtype (PyTorch's kernel) or float32 (ours)
    scale_bytes = {"reference": 2, "cpu_int8pack": 2, "cpu_int8_bf16dot": 4, "cpu_int8_wo_avx2": 4}
    for model, dtype in ((quantized, torch.float32), (AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16),
                                                      torch.bfloat16)):
        kernel = expected_cpu_kernel(modules["model.embed_tokens"], dtype)
        assert model.model.embed_tokens.prepared.kernel == kernel
        table_bytes = sum(b.numel() * b.element_size() for b in model.model.embed_tokens.buffers())
        assert table_bytes == 320 * (96 + scale_bytes[kernel]), kernel
    reference = dequantized_float_model(source, out)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = quantized(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tied_checkpoint_with_a_stored_head_is_refused(tmp_path, make_tiny_model):
    source = make_tiny_model("llama", tmp_path / "src", tie_word_embeddings=True)
    out = tmp_path / "nano"
    quantize_checkpoint(source, out, load_recipe("qkv-fp16"), progress=False)
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(320, 96, dtype=torch.bfloat16)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(Exception, match=r"model.safetensors: 'lm_head.weight' is stored although config.json ties"):
        load_nano_checkpoint(out)


def test_nvfp4_fused_parts_share_a_global_scale_and_entropy_is_recorded(tiny_llama, tmp_path):
    from nanoq_plugin.engines.common import fused_scheme
    from nanoq_plugin.errors import NanoqError
    from nanoq_plugin.format.quant_config import NanoQuantConfig

    out = tmp_path / "nvfp4"
    result = quantize_checkpoint(tiny_llama, out, load_recipe("nvfp4-alpha2"), progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        for index in range(2):
            stem = f"model.layers.{index}"
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
                scales = {handle.get_tensor(f"{stem}.{part}.global_scale").item() for part in group}
                assert len(scales) == 1, (stem, group, scales)
            assert handle.get_tensor(f"{stem}.self_attn.o_proj.global_scale").item() != \
                handle.get_tensor(f"{stem}.self_attn.q_proj.global_scale").item()
    modules = result.manifest["modules"]
    assert all(0 < m["packed_entropy_bits"] <= 8 for m in modules.values())
    assert 0 < result.manifest["totals"]["packed_entropy_bits"] < 8
    assert result.manifest["provenance"]["recipe"]["nvfp4_alpha"] == 2.0
    config = NanoQuantConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    with pytest.raises(NanoqError, match="qkv_proj is nvfp4, which vLLM serves natively: convert the checkpoint"):
        fused_scheme(config, "model.layers.0.self_attn.qkv_proj", {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, "vLLM")
