"""Where int4 g128 RTN loses on each example model: which linears, and why (weights or inputs).

For each model (SmolLM2-135M, Gemma 3 270M), w4g128 RTN (the recipe of the quality table; the embedding and
the tied head stay float) and, on the first windows of WikiText-2 test (ctx 512, stride 256, like quality.py):
- ablation: perplexity ratio with only one kind of linear quantized (q, k, v, o, gate, up, down), the others float;
- per linear kind and per block: relative weight error (the manifest's) and relative output error
  ||x Wq^T - x W^T|| / ||x W^T|| on the float model's own inputs x;
- the inputs: per linear kind, the largest channel's absolute maximum over the median channel's (outlier
  channels), and the RMSNorm scales feeding the linears (Gemma computes x * (1 + w)).
Writes benchmarks/results/quality-why.json.

    python benchmarks/quality_why.py [--windows 16] [--models smollm2 gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nanoq_plugin
from nanoq_plugin.eval.perplexity import evaluate_perplexity
from nanoq_plugin.eval.reference_model import dequantized_float_model
from nanoq_plugin.example_model import EXAMPLE_MODELS, write_example_model
from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
from nanoq_plugin.quantizers.recipe import load_recipe
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "data" / "wikitext-2-raw" / "wiki.test.raw"  # CC BY-SA 3.0 (tests/data/README.md)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR = re.compile(r"model\.layers\.(\d+)\.\w+\.(\w+_proj)$")


def linears(model) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if LINEAR.match(name)}


def output_errors(base, quantized_weights: dict[str, torch.Tensor], token_ids, windows: int) -> dict[str, dict]:
    """Per linear: squared output error and output norm summed over `windows` windows of 512, and the largest
    and median channel absolute maxima of its input."""
    stats = defaultdict(lambda: {"err2": 0.0, "out2": 0.0, "absmax": None})
    hooks = []
    for name, module in linears(base).items():
        def hook(module, args, output, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            entry = stats[name]
            entry["err2"] += (x @ (quantized_weights[name] - module.weight).T).square().sum().item()
            entry["out2"] += output.square().sum().item()
            channel = x.abs().amax(0)
            entry["absmax"] = channel if entry["absmax"] is None else torch.maximum(entry["absmax"], channel)
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for w in range(windows):
            base(token_ids[w * 256: w * 256 + 512].unsqueeze(0))
    for hook in hooks:
        hook.remove()
    result = {}
    for name, entry in stats.items():
        absmax = entry["absmax"]
        result[name] = {"rel_output_error": (entry["err2"] / entry["out2"]) ** 0.5,
                        "input_outlier_ratio": (absmax.max() / absmax.median()).item(),
                        "input_absmax": absmax.max().item()}
    return result


def norm_scales(base, model_type: str) -> dict[str, float]:
    """Largest and median multiplier of the RMSNorms in the blocks (Gemma: 1 + w)."""
    values = [module.weight.detach().float() + (1.0 if model_type.startswith("gemma") else 0.0)
              for name, module in base.named_modules()
              if name.startswith("model.layers.") and name.endswith("norm") and not name.endswith(("q_norm", "k_norm"))]
    flat = torch.cat(values)
    return {"max_abs": flat.abs().max().item(), "median_abs": flat.abs().median().item()}


def analyse(name: str, windows: int, work: Path) -> dict:
    entry = EXAMPLE_MODELS[name]
    base_dir = REPO / ".cache" / entry.name
    if not (base_dir / "model.safetensors").is_file():
        write_example_model(base_dir, entry.name)
    nano_dir = work / f"why-{entry.name}-w4g128"
    if not (nano_dir / "nano_manifest.json").is_file():
        quantize_checkpoint(base_dir, nano_dir, load_recipe("w4g128"), progress=True)
    manifest = json.loads((nano_dir / "nano_manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    token_ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    deq = dequantized_float_model(base_dir, nano_dir)
    quantized = {n: m.weight.detach().clone() for n, m in linears(deq).items()}
    del deq
    floats = {n: m.weight.detach().clone() for n, m in linears(base).items()}

    per_linear = output_errors(base, quantized, token_ids, min(windows, 4))
    for linear_name, record in per_linear.items():
        record["rel_weight_error"] = manifest["modules"][linear_name]["rel_error"]

    def summary(key: str, group) -> dict:
        groups = defaultdict(list)
        for linear_name, record in per_linear.items():
            groups[group(linear_name)].append(record[key])
        return {g: round(sum(v) / len(v), 4) for g, v in sorted(groups.items())}

    by_kind = lambda n: LINEAR.match(n).group(2)  # noqa: E731
    by_block = lambda n: int(LINEAR.match(n).group(1))  # noqa: E731

    def set_weights(kinds: tuple[str, ...]) -> None:
        for linear_name, module in linears(base).items():
            module.weight.data = quantized[linear_name] if by_kind(linear_name) in kinds else floats[linear_name]

    start = time.perf_counter()
    set_weights(())
    base_ppl = evaluate_perplexity({"base": base}, token_ids, 512, 256, windows, progress=False).perplexity["base"]
    ablation = {}
    for label, kinds in [("all", KINDS), *((kind, (kind,)) for kind in KINDS)]:
        set_weights(kinds)
        ppl = evaluate_perplexity({label: base}, token_ids, 512, 256, windows, progress=False).perplexity[label]
        ablation[label] = round(ppl / base_ppl, 4)
        print(f"{entry.name}: only {label} quantized: ratio {ablation[label]}", flush=True)
    config = base.config
    return {
        "model": f"{entry.model_name} ({entry.pin}; license: {entry.license})",
        "checkpoint": "w4g128 RTN (embedding and tied head float)",
        "shapes": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                   "layers": config.num_hidden_layers, "vocab": config.vocab_size},
        "softcapping": {"final_logit": getattr(config, "final_logit_softcapping", None),
                        "attention": getattr(config, "attn_logit_softcapping", None)},
        "base_perplexity": round(base_ppl, 4),
        "ppl_ratio_only_this_kind_quantized": ablation,
        "rel_weight_error_by_kind": summary("rel_weight_error", by_kind),
        "rel_output_error_by_kind": summary("rel_output_error", by_kind),
        "rel_output_error_by_block": summary("rel_output_error", by_block),
        "input_outlier_ratio_by_kind": summary("input_outlier_ratio", by_kind),
        "input_absmax_by_kind": summary("input_absmax", by_kind),
        "input_outlier_ratio_by_block": summary("input_outlier_ratio", by_block),
        "block_norm_multipliers": {k: round(v, 3) for k, v in norm_scales(base, config.model_type).items()},
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--models", nargs="+", choices=list(EXAMPLE_MODELS), default=list(EXAMPLE_MODELS))
    parser.add_argument("--work", default=str(REPO / ".cache/bench"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/quality-why.json"))
    args = parser.parse_args()
    report = {
        "provenance": provenance(),
        "benchmark": "quality-why",
        "protocol": {"text": "wikitext-2-raw wiki.test.raw", "ctx": 512, "stride": 256, "windows": args.windows,
                     "output_error_windows": min(args.windows, 4)},
        "versions": {"nanoq": nanoq_plugin.__version__, "torch": torch.__version__},
        "models": {name: analyse(name, args.windows, Path(args.work)) for name in args.models},
        "note": "rel_output_error: over the float model's inputs to each linear, ||x (Wq - W)^T|| / ||x W^T||, mean "
                "over the linears of a kind or block; input_outlier_ratio: largest channel absolute maximum over the "
                "median channel's, mean over the linears of a kind or block",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["models"], indent=1))


if __name__ == "__main__":
    main()
