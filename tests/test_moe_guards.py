"""Guards against silently corrupted mixture-of-experts checkpoints, on a tiny random MoE whose routing is
deliberately uneven (a few popular experts, some rare ones): quantized by nanoq's own quantizer and loaded by the
transformers engine (`NanoExperts`), the model's routers pick the same top-k experts as the float model's for
>= 95 % of tokens at w8 and w4g128, and its logits stay close to the float model's; a checkpoint whose experts
are permuted (each expert's tensors valid, under another expert's name) fails both."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers  # noqa: F401  (imported first: nanoq registers `nano` with it on import)
from safetensors.torch import load_file, save_file

from nanoq_plugin.engines.transformers import NanoExperts
from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.eval.routing import RoutingRecorder, routing_agreement
from nanoq_plugin.format.checkpoint import SourceCheckpoint
from nanoq_plugin.format.expected_tensors import model_tensors
from nanoq_plugin.format.reference import dequantize
from nanoq_plugin.format.validate import load_nano_checkpoint
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import PRESETS
from tiny_models import build_tiny_model

LAYERS = 3
TOKENS = torch.randint(3, 320, (256,), generator=torch.Generator().manual_seed(7))
MIN_AGREEMENT = 0.95
UPDATE_SCALE = 0.15
LEAN = 2.0  # how strongly every token leans towards the low-numbered experts


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def uneven_moe(request, tmp_path_factory):
    """(family, float source): a tiny MoE whose every token leans towards the low-numbered experts: all token
    embeddings share one direction `m`, and expert e's router row gets `(E - 1 - e) / E` times it, on top of
    router rows scaled up to a trained router's confidence (random init gives near ties)."""
    base = tmp_path_factory.mktemp(request.param)
    source = build_tiny_model(request.param, base / "built", num_layers=LAYERS, dtype=torch.float32)
    model = _load(source)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        shared = torch.randn(embed.shape[1], generator=generator)
        shared /= shared.norm()
        embed.add_(embed.norm(dim=1).mean() * shared)  # as long as a row itself
        for layer in model.model.layers:
            router = layer.mlp.gate.weight  # transformers' own router [E, H]
            experts = router.shape[0]
            lean = torch.tensor([(experts - 1 - e) / experts for e in range(experts)])
            router.mul_(4.0 / router.norm(dim=1, keepdim=True).mean())
            router.add_(LEAN * lean[:, None] * shared[None, :])
            # blocks write small updates into the residual stream, as trained models' do (random init writes
            # updates as large as the stream, and every quantization error reaches the next router in full)
            layer.self_attn.o_proj.weight.mul_(UPDATE_SCALE)
            layer.mlp.experts.down_proj.mul_(UPDATE_SCALE)
    model.save_pretrained(base / "uneven")
    return request.param, base / "uneven"


def _routing(base, quantized, windows=3, ctx=64):
    """Routing agreement (`eval.routing`) of two loaded models over `windows` windows of TOKENS, and the
    per-expert routed-token counts of the base model's first block."""
    with RoutingRecorder(quantized) as ours, RoutingRecorder(base) as theirs:
        evaluate_perplexity({"base": base, "quantized": quantized}, TOKENS, ctx, ctx, windows, reference="base",
                            progress=False)
    first = sorted(theirs.calls)[0]
    counts = torch.bincount(torch.cat(theirs.calls[first]).reshape(-1), minlength=8)
    return routing_agreement(theirs, ours), counts


def _logit_error(base, quantized):
    """max |quantized - base| / max |base| over the logits of TOKENS."""
    with torch.no_grad():
        want, got = base(TOKENS[None, :64]).logits, quantized(TOKENS[None, :64]).logits
    return float((got - want).abs().max() / want.abs().max())


def _expert_weight_errors(source, nano_dir) -> dict[str, float]:
    """Every stored expert projection of `nano_dir`: relative error of its reference dequantization against the
    float source's weight of the same (saved) name."""
    checkpoint = load_nano_checkpoint(nano_dir)
    float_source = SourceCheckpoint(source)
    errors = {}
    for experts in model_tensors(float_source.config, "config.json").experts:
        for module in experts.modules():
            weight = float_source.get(f"{module}.weight").float()
            scheme = checkpoint.quant_config.modules[module]
            restored = dequantize(checkpoint.module_tensors(module), scheme, *weight.shape)
            errors[module] = float((restored - weight).norm() / weight.norm())
    return errors


# an honest checkpoint measures several times below each bound (expert weights: w8 ~0.004, w4g128 ~0.09 relative
# error; logits: w8 ~0.003, w4g128 ~0.04 of the largest logit)
BOUNDS = {"w8": {"weights": 0.02, "logits": 0.01}, "w4g128": {"weights": 0.15, "logits": 0.1}}


def guard(source, nano_dir, preset: str) -> dict:
    """The MoE guard, AssertionError naming every check that fails: each expert's dequantized weight within the
    preset's bound of the float weight stored under its name; routing agreement >= 95 % (transformers engine vs
    float model); logits within the preset's bound of the float model's. Returns the figures."""
    base, quantized = _load(source), _load(nano_dir)
    errors = _expert_weight_errors(source, nano_dir)
    agreement, counts = _routing(base, quantized)
    logit_error = _logit_error(base, quantized)
    bound = BOUNDS[preset]
    failed = []
    worst = max(errors, key=errors.get)
    if errors[worst] > bound["weights"]:
        failed.append(f"expert weights: '{worst}' is {errors[worst]:.3f} from its float weight ({bound['weights']})")
    if agreement["overall"] < MIN_AGREEMENT:
        failed.append(f"routing agreement {agreement['overall']:.3f} < {MIN_AGREEMENT} ({agreement['blocks']})")
    if logit_error > bound["logits"]:
        failed.append(f"logits {logit_error:.4f} from the float model's ({bound['logits']})")
    assert not failed, "; ".join(failed)
    return {"weights": errors[worst], "agreement": agreement, "logit_error": logit_error, "routed": counts}


@pytest.fixture(scope="module")
def quantized(uneven_moe, tmp_path_factory):
    """preset -> the nano checkpoint `nanoq quantize` (RTN) makes of the uneven MoE."""
    _, source = uneven_moe
    base = tmp_path_factory.mktemp("nano")
    out = {}
    for preset in ("w8", "w4g128"):
        quantize_checkpoint(source, base / preset, PRESETS[preset], progress=False)
        out[preset] = base / preset
    return out


@pytest.mark.parametrize("preset", ["w8", "w4g128"])
def test_routing_agreement_of_quantized_experts(uneven_moe, quantized, preset):
    _, source = uneven_moe
    assert sum(isinstance(m, NanoExperts) for m in _load(quantized[preset]).modules()) == LAYERS
    figures = guard(source, quantized[preset], preset)
    counts = figures["routed"]
    assert counts.max() >= 8 * max(int(counts.min()), 1), f"routing is not uneven: {counts.tolist()}"
    assert figures["agreement"]["tokens"] == 3 * 64


def _permute_experts(directory, block: int, family: str) -> None:
    """Swap every stored tensor of experts 0 and 3 of `block` (valid tensors under each other's name)."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    holder = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}[family]
    first, second = f"model.layers.{block}.{holder}.experts.0.", f"model.layers.{block}.{holder}.experts.3."
    swapped = {}
    for name, tensor in tensors.items():
        if name.startswith(first):
            swapped[second + name.removeprefix(first)] = tensor
        elif name.startswith(second):
            swapped[first + name.removeprefix(second)] = tensor
        else:
            swapped[name] = tensor
    save_file(swapped, str(path), metadata={"format": "pt"})
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["modules"]


def test_permuted_experts_fail_the_guard(uneven_moe, quantized, tmp_path):
    family, source = uneven_moe
    out = tmp_path / "w8"
    shutil.copytree(quantized["w8"], out)  # which passes the guard (test above)
    _permute_experts(out, 0, family)  # a popular and a rare expert of the first block trade places
    with pytest.raises(AssertionError) as failure:
        guard(source, out, "w8")
    assert "expert weights: 'model.layers.0." in str(failure.value)  # the stored tensors give it away
    assert "logits" in str(failure.value)  # and so does the model it makes, without knowing the names


def _add_tokenizer(directory, text: str) -> None:
    """A 320-token byte-level BPE trained on `text` (the tiny models' vocabulary size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text] * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)


def test_nanoq_eval_reports_routing_agreement(uneven_moe, quantized, tmp_path, capsys):
    from nanoq_plugin.cli import main

    family, source = uneven_moe
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the report's plumbing")
    text = " ".join(f"The river {i} runs to the sea, and the fox jumps over {i + 7} lazy dogs." for i in range(30))
    out = tmp_path / "w4g128"
    shutil.copytree(quantized["w4g128"], out)
    _add_tokenizer(out, text)
    (tmp_path / "text.txt").write_text(text)
    assert main(["eval", str(out), "--base", str(source), "--text", str(tmp_path / "text.txt"), "--ctx", "64",
                 "--stride", "64", "--max-windows", "2", "--quiet"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    routing = summary["routing_agreement"]
    assert set(routing["blocks"]) == {f"model.layers.{i}.mlp.experts" for i in range(LAYERS)}
    assert routing["tokens"] == 2 * 64 and 0.9 <= routing["overall"] <= 1.0
    assert f"Routing agreement with base (tokens whose top-k experts are the same set): **{routing['overall']:.4f}**" \
        in (out / "README.md").read_text()
    assert f"routing agreement {routing['overall']:.4f}" in capsys.readouterr().out
