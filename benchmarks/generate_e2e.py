"""End-to-end decode speed and peak memory of transformers generation: bf16 vs nano w8, w4g128 and cb4g128.

    python benchmarks/generate_e2e.py                 # Llama-3-8B shapes, random weights, on the GPU
    python benchmarks/generate_e2e.py --tiny --device cpu   # a smoke run of the same code on a small model

No hub: the model is built from a LlamaConfig with random weights (seeded), each variant from the same
seed. Quantized variants swap every decoder linear for a `NanoLinear` holding RTN-quantized tensors
(nearest-level codebook tensors for `cb*`), repacked once for the device's kernel (Triton on CUDA).
For each batch size it measures two things:
- `model.generate`: a prefill-only call and a greedy generation of `--new-tokens` (EOS ignored), medians
  of 3; decode tokens/s = batch x (new tokens - 1) / (generate time - prefill time). Eager transformers
  launches every kernel from Python, so on a fast GPU this is bound by launch overhead at small batches;
- one decode step with a `StaticCache` after a `--prompt-len` prefill, captured in a CUDA graph and
  replayed (what a serving engine runs; `--no-graph` or a CPU device times it eagerly): median ms per
  step and tokens/s = batch / step time.
Peak memory is `torch.cuda.max_memory_allocated` during generation. Writes
benchmarks/results/e2e-<device>.json with ratios to bf16 measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from nanoq_plugin.engines.transformers import NanoLinear
from nanoq_plugin.format.schemes import parse_scheme
from nanoq_plugin.quantizers.data_free import quantize_data_free

REPO = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024)
VARIANTS = {"bf16": None, "w8": "int8", "w4g128": "int4g128", "cb4g128": "cb4g128"}


def build_model(shape: dict, device: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():
        if param.dim() == 2:
            param.data.normal_(0, 0.02)
    return model.eval()


def quantize_linears(model: LlamaForCausalLM, scheme_name: str) -> None:
    """Swap every decoder-block nn.Linear for a prepared NanoLinear (RTN; nearest level for codebooks),
    freeing the bf16 weight."""
    scheme = parse_scheme(scheme_name)
    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            parent = layer.get_submodule(name.rpartition(".")[0])
            with torch.device(linear.weight.device):
                nano = NanoLinear(linear.in_features, linear.out_features, scheme, False, torch.bfloat16)
            for part, tensor in quantize_data_free(linear.weight.data.float(), scheme).items():
                getattr(nano, part).data = tensor
            nano.prepare(name)
            setattr(parent, name.rpartition(".")[2], nano)
            del linear
    gc.collect()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_generation(model, batch: int, prompt_len: int, new_tokens: int, device: str, repeats: int = 3) -> dict:
    """Median prefill-only and full-generation times; decode tokens/s from their difference."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)

    def generate(tokens: int):
        return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        generate(4)  # warm-up: kernels tuned, caches allocated
        prefill = _median_seconds(lambda: generate(1), device, repeats)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        total = _median_seconds(lambda: generate(new_tokens), device, repeats)
        generated = new_tokens  # min_new_tokens = max_new_tokens: EOS cannot end it early
    decode = total - prefill
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": generated, "prefill_s": prefill, "generate_s": total,
        "decode_tokens_per_s": batch * (generated - 1) / decode if decode > 0 else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def time_static_decode(model, batch: int, prompt_len: int, device: str, use_graph: bool, repeats: int = 50) -> dict:
    """Median time of one decode step (`batch` new tokens at position `prompt_len`) on a StaticCache, replayed
    from a CUDA graph when `use_graph`. Every step writes the same cache slot: the attention span stays
    `prompt_len + 1`, so each replay does the same work."""
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    token = torch.zeros((batch, 1), dtype=torch.long, device=device)
    position = torch.tensor([prompt_len], device=device)

    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt_len, device=device), use_cache=True)
        # transformers >= 5.18 keeps the write position in each layer (a device tensor advanced in place)
        counters = [layer.cumulative_length for layer in getattr(cache, "layers", ())
                    if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

        def step():
            logits = model(token, past_key_values=cache, cache_position=position, use_cache=True).logits
            for counter in counters:
                counter.fill_(prompt_len)
            return logits

        run = step
        if use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()
            run = graph.replay
        eager = step().float()
        run()
        replayed = (captured if use_graph else step()).float()
        # the replay must compute what eager execution does (same inputs, same cache slot)
        replay_error = (torch.linalg.norm(replayed - eager) / torch.linalg.norm(eager)).item()
        step_s = _median_seconds(run, device, repeats)
    return {"batch": batch, "context": prompt_len + 1, "cuda_graph": use_graph, "step_ms": step_s * 1e3,
            "tokens_per_s": batch / step_s, "replay_vs_eager_rel_error": replay_error}


def write_results(results: dict, out: Path) -> None:
    """Add the ratios to bf16 and write `results` (after every variant, so a run stopped early keeps its data)."""
    base = results["variants"]["bf16"]
    for data in results["variants"].values():
        for run, ref in zip(data["runs"], base["runs"]):
            if run["decode_tokens_per_s"] and ref["decode_tokens_per_s"]:
                run["decode_speedup_vs_bf16"] = run["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            if run["peak_memory_gib"] is not None:
                run["peak_memory_ratio_vs_bf16"] = run["peak_memory_gib"] / ref["peak_memory_gib"]
        for step, ref in zip(data["decode_steps"], base["decode_steps"]):
            if "step_ms" in step and "step_ms" in ref:
                step["speedup_vs_bf16"] = ref["step_ms"] / step["step_ms"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small Llama instead of Llama-3-8B shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-graph", action="store_true", help="time the static-cache decode step eagerly")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    use_graph = args.device == "cuda" and not args.no_graph
    shape = TINY if args.tiny else LLAMA3_8B
    device_label = torch.cuda.get_device_name().replace(" ", "-") if args.device == "cuda" else "cpu"
    results = {"device": device_label, "model": "tiny llama" if args.tiny else "Llama-3-8B shapes (random weights)",
               "torch": torch.__version__, "variants": {}}
    out = Path(args.out or REPO / "benchmarks/results" / f"e2e-{device_label}.json")
    for variant in ["bf16"] + [v for v in args.variants if v != "bf16"]:
        scheme = VARIANTS[variant]
        model = build_model(shape, args.device, seed=0)
        if scheme is not None:
            quantize_linears(model, scheme)
        weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        runs = [time_generation(model, b, args.prompt_len, args.new_tokens, args.device) for b in args.batches]
        steps = []
        for batch in args.batches:
            try:
                steps.append(time_static_decode(model, batch, args.prompt_len, args.device, use_graph))
            except Exception as error:  # noqa: BLE001 — recorded in the results, the other measurements stand
                steps.append({"batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
                print(f"{variant}: static-cache decode step failed at batch {batch}: {steps[-1]['error']}", flush=True)
        results["variants"][variant] = {"weight_gib": weight_bytes / 2**30, "runs": runs, "decode_steps": steps}
        for run, step in zip(runs, steps):
            step_text = (f"{step['tokens_per_s']:9.1f} tok/s ({step['step_ms']:.2f} ms/step)" if "step_ms" in step
                         else "failed")
            generate_rate = run["decode_tokens_per_s"] or float("nan")
            print(f"{variant:7s} batch {run['batch']:3d}: generate {generate_rate:9.1f} decode "
                  f"tok/s, static step {step_text}, peak {run['peak_memory_gib'] or 0:.2f} GiB, "
                  f"weights {weight_bytes / 2**30:.2f} GiB", flush=True)
        write_results(results, out)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
