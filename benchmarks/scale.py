"""Quantizing at scale: a Llama-3-8B-shaped checkpoint (random bf16 weights), RTN and GPTQ w4g128, with wall
time, peak RSS and the largest single allocation of each run.

The source is generated here, streamed tensor by tensor (chunks of rows) into sharded safetensors with an index:
one shard for the embedding, one per decoder block, one for the final norm and the LM head, so that memory never
holds more than one chunk and a run on the first blocks is a folder of links (below). A source with the same
shape and seed is reused. Calibration text: WikiText-2 valid tokens with the tokenizer of `--tokenizer`
(its ids index the random embedding; the weights are random, so the text only sets realistic activation counts).

Each quantization runs in its own process, so that its peak RSS (`ru_maxrss`) is its own. When `strace` is
installed the process runs under it, recording anonymous memory maps: glibc serves every allocation of 32 MiB
or more with its own map, so the largest map is the largest single allocation of that size (smaller ones come
from the heap and are not seen); on CUDA the largest block the caching allocator handed out is recorded too.

RTN quantizes the whole model. GPTQ (`--gptq-blocks K`, 128 x 512 calibration tokens by default) runs on the first
K blocks (the source's first shards, linked): the pipeline times each block (reading, quantizing and writing
it), the rest of the run (imports excluded: embedding, calibration, head) is the run less its blocks, and the
whole model (`--extrapolate-layers`, default `--layers`) is extrapolated as the rest plus the depth times the mean
block, marked so in the JSON; `--rtn-blocks K` does the same for RTN. Peak memory of a GPTQ run is reached inside
a block, but a K-block run writes fewer output bytes than a full run: its output shard may not have reached full
size.

    python benchmarks/scale.py                       # Llama-3-8B shape, ~16 GB source under .cache/scale
    python benchmarks/scale.py --device cuda         # the same quantized on the GPU
    python benchmarks/scale.py --hidden 1024 --intermediate 3584 --heads 8 --kv-heads 2 --layers 4   # medium
    python benchmarks/scale.py --methods gptq --gptq-blocks 1       # GPTQ on the 8B's first block, extrapolated

Writes benchmarks/results/scale-<shape>-<device>.json (shape `llama3-8b`, else `h<hidden>-l<layers>`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "tests/data/wikitext-2/wiki.valid.tokens"  # CC BY-SA 3.0 (tests/data/README.md)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
SOURCE_MARKER = "scale_source.json"
RESULT_PREFIX = "SCALE_RESULT "
CHUNK_ELEMENTS = 1 << 24  # rows are generated and written in chunks of at most this many values
BYTES_BF16 = 2
INIT_STD = 0.02  # Llama's initializer range


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's sizes."""

    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    layers: int = 32

    @property
    def name(self) -> str:
        return "llama3-8b" if self == Shape() else f"h{self.hidden}-l{self.layers}"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self, index: int) -> list[tuple[str, tuple[int, ...]]]:
        """`(name, shape)` of decoder block `index`, in the order they are written."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        stem = f"model.layers.{index}"
        return [(f"{stem}.input_layernorm.weight", (h,)),
                (f"{stem}.self_attn.q_proj.weight", (h, h)), (f"{stem}.self_attn.k_proj.weight", (kv, h)),
                (f"{stem}.self_attn.v_proj.weight", (kv, h)), (f"{stem}.self_attn.o_proj.weight", (h, h)),
                (f"{stem}.post_attention_layernorm.weight", (h,)),
                (f"{stem}.mlp.gate_proj.weight", (i, h)), (f"{stem}.mlp.up_proj.weight", (i, h)),
                (f"{stem}.mlp.down_proj.weight", (h, i))]

    def shards(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """The source's shards: the embedding, one per block, then the final norm and the LM head."""
        return ([[("model.embed_tokens.weight", (self.vocab, self.hidden))]]
                + [self.block_tensors(index) for index in range(self.layers)]
                + [[("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]])

    def block_bytes(self) -> int:
        return sum(math.prod(shape) for _, shape in self.block_tensors(0)) * BYTES_BF16

    def embedding_bytes(self) -> int:
        return self.vocab * self.hidden * BYTES_BF16

    def params(self) -> int:
        return sum(math.prod(shape) for shard in self.shards() for _, shape in shard)


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def _values(name: str, shape: tuple[int, ...], seed: int):
    """The tensor `name` in row chunks (bf16): norms are ones, matrices N(0, 0.02) from a generator seeded by
    `seed` and the name, so that a tensor's values do not depend on which others are generated."""
    import torch

    if len(shape) == 1:
        yield torch.ones(shape, dtype=torch.bfloat16)
        return
    generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
    rows, cols = shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        yield (torch.randn((count, cols), generator=generator) * INIT_STD).to(torch.bfloat16)


def write_streaming_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Write bf16 `tensors` to `path` chunk by chunk (the header first: every size is known); returns the bytes
    of tensor data."""
    import torch

    from nanoq_plugin.format.safetensors_stream import header_bytes

    header, offset = {}, 0
    for name, shape in tensors:
        size = math.prod(shape) * BYTES_BF16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    with open(path, "wb") as handle:
        handle.write(header_bytes(header, {"format": "pt"}))
        for name, shape in tensors:
            for chunk in _values(name, shape, seed):
                handle.write(chunk.contiguous().view(-1).view(torch.uint8).numpy().data)
    return offset


def llama_config(shape: Shape, tokenizer_dir: Path, layers: int | None = None) -> dict:
    """config.json of a Llama-3-style model of `shape` (untied head, bf16) with `tokenizer_dir`'s special ids."""
    from transformers import LlamaConfig

    special = json.loads((tokenizer_dir / "config.json").read_text()) if (tokenizer_dir / "config.json").is_file() else {}
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, num_hidden_layers=shape.layers if layers is None else layers,
        vocab_size=shape.vocab, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    data = config.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = "bfloat16"
    return data


def copy_tokenizer(tokenizer_dir: Path, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, directory / name)


def generate_source(directory: Path, shape: Shape, tokenizer_dir: Path, seed: int = 0) -> dict:
    """The random checkpoint of `shape` in `directory` (reused when it was made with the same shape and seed);
    returns what was made and how long it took (0 when reused)."""
    marker = {"shape": asdict(shape), "seed": seed, "std": INIT_STD}
    if (directory / SOURCE_MARKER).is_file() and json.loads((directory / SOURCE_MARKER).read_text()) == marker:
        reused = True
        seconds = 0.0
    else:
        reused = False
        start = time.perf_counter()
        if directory.exists():
            shutil.rmtree(directory)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shards = shape.shards()
        weight_map, total = {}, 0
        for number, tensors in enumerate(shards, start=1):
            name = shard_name(number, len(shards))
            total += write_streaming_safetensors(staging / name, tensors, seed)
            weight_map.update({tensor: name for tensor, _ in tensors})
            print(f"generated {name} ({number}/{len(shards)})", file=sys.stderr, flush=True)
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(llama_config(shape, tokenizer_dir), indent=2) + "\n")
        copy_tokenizer(tokenizer_dir, staging)
        (staging / SOURCE_MARKER).write_text(json.dumps(marker) + "\n")
        staging.rename(directory)
        seconds = time.perf_counter() - start
    files = sorted(directory.glob("*.safetensors"))
    return {"directory": str(directory), "shards": len(files), "bytes": sum(f.stat().st_size for f in files),
            "generate_seconds": round(seconds, 1), "reused": reused}


def first_blocks_view(source: Path, shape: Shape, blocks: int, directory: Path) -> Path:
    """A folder standing for the model cut after `blocks` blocks: its config says so, its index lists the
    embedding, those blocks and the head, whose shards are links to the source's."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    shards = shape.shards()
    kept = [0, *range(1, blocks + 1), len(shards) - 1]
    weight_map = {}
    for number in kept:
        name = shard_name(number + 1, len(shards))
        (directory / name).symlink_to((source / name).resolve())
        weight_map.update({tensor: name for tensor, _ in shards[number]})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(source, directory)
    return directory


def largest_anonymous_map(trace: Path) -> int | None:
    """Largest read-write anonymous `mmap` length (or `mremap` new length) in an strace log."""
    largest = None
    mmap = re.compile(r"mmap\(NULL, (\d+), PROT_READ\|PROT_WRITE, (MAP_[A-Z_|]+)")
    mremap = re.compile(r"mremap\(0x[0-9a-f]+, \d+, (\d+),")
    with open(trace, errors="replace") as lines:
        for line in lines:
            if "= -1" in line:
                continue
            found = mmap.search(line)
            if found and "MAP_ANONYMOUS" in found.group(2) and "MAP_STACK" not in found.group(2):
                largest = max(largest or 0, int(found.group(1)))
            found = mremap.search(line)
            if found:
                largest = max(largest or 0, int(found.group(1)))
    return largest


def quantize_in_child(source: Path, output: Path, method: str, device: str, calibration: Path | None,
                      calib_windows: int, calib_seq_len: int, max_shard_bytes: int, trace: bool) -> dict:
    """Run `_quantize_one` in a fresh process (under strace when asked and available); its result."""
    request = {"source": str(source), "output": str(output), "method": method, "device": device,
               "calibration": str(calibration) if calibration else None, "calib_windows": calib_windows,
               "calib_seq_len": calib_seq_len, "max_shard_bytes": max_shard_bytes}
    command = [sys.executable, str(Path(__file__).resolve()), "--quantize-one", json.dumps(request)]
    strace = shutil.which("strace") if trace else None
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "strace.log"
        if strace:
            command = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=mmap,mremap", "-o", str(log), *command]
        completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
        if completed.returncode != 0:
            raise SystemExit(f"quantizing {source} ({method}) failed with exit status {completed.returncode}")
        line = next(line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX))
        result = json.loads(line.removeprefix(RESULT_PREFIX))
        result["largest_map_bytes"] = largest_anonymous_map(log) if strace else None
    result["largest_map_how"] = ("strace: largest anonymous read-write mmap/mremap (every allocation >= 32 MiB)"
                                 if strace else "not measured (no strace)")
    return result


def _quantize_one(request: dict) -> None:
    """The child: quantize as asked, print the result line."""
    import resource

    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  (imported before the clock and the RSS baseline start)

    from nanoq_plugin.format.checkpoint import INDEX_NAME
    from nanoq_plugin.quantizers.pipeline import quantize_checkpoint
    from nanoq_plugin.quantizers.recipe import load_recipe

    recipe = load_recipe("w4g128")
    if request["method"] != "rtn":
        recipe = recipe.with_method(request["method"])
    cuda = request["device"].startswith("cuda")
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = quantize_checkpoint(request["source"], request["output"], recipe, device=request["device"],
                                 calibration=request["calibration"], progress=True,
                                 max_shard_bytes=request["max_shard_bytes"], calib_windows=request["calib_windows"],
                                 calib_seq_len=request["calib_seq_len"])
    output = Path(request["output"])
    files = sorted(output.glob("*.safetensors"))
    record = {"seconds": round(result.seconds, 2), "peak_rss_bytes": result.peak_rss_bytes,
              "peak_rss_after_imports_bytes": after_imports, "output_shards": len(files),
              "output_index": (output / INDEX_NAME).is_file(), "output_bytes": sum(f.stat().st_size for f in files),
              "threads": torch.get_num_threads(), "block_seconds": [round(t, 2) for t in result.block_seconds]}
    if cuda:
        record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        traces = torch.cuda.memory._snapshot()["device_traces"]
        record["gpu_largest_allocation_bytes"] = max(
            (entry["size"] for device in traces for entry in device if entry["action"] == "alloc"), default=None)
        torch.cuda.memory._record_memory_history(enabled=None)
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def budget(shape: Shape, max_shard_bytes: int) -> dict:
    """The goal of issue 20: peak RSS within 2 blocks of float weights, one output shard and the embedding."""
    two_blocks, embedding = 2 * shape.block_bytes(), shape.embedding_bytes()
    return {"two_blocks_bytes": two_blocks, "output_shard_bytes": max_shard_bytes, "embedding_bytes": embedding,
            "total_bytes": two_blocks + max_shard_bytes + embedding,
            "note": "weights counted in the source dtype (bf16); compared with the peak RSS above the process's "
                    "RSS after imports (python, torch, transformers)"}


def _within(run: dict, limit: dict) -> bool:
    return run["peak_rss_bytes"] - run["peak_rss_after_imports_bytes"] <= limit["total_bytes"]


def extrapolate(run: dict, depth: int) -> dict:
    """The whole model's time from a run on its first blocks: the run's time outside its blocks plus `depth`
    times its mean block time (the pipeline's own per-block clock)."""
    blocks = run["block_seconds"]
    per_block = sum(blocks) / len(blocks)
    outside = run["seconds"] - sum(blocks)
    return {"method": run["method"], "scheme": run["scheme"], "device": run["device"], "extrapolated": True,
            "blocks_measured": [len(blocks)], "per_block_seconds": round(per_block, 2),
            "per_block_spread_seconds": [min(blocks), max(blocks)], "outside_blocks_seconds": round(outside, 2),
            "seconds": round(outside + depth * per_block, 1),
            "note": f"whole model ({depth} blocks) from a run on its first {len(blocks)}: not measured"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Shape()
    parser.add_argument("--hidden", type=int, default=default.hidden)
    parser.add_argument("--intermediate", type=int, default=default.intermediate)
    parser.add_argument("--heads", type=int, default=default.heads)
    parser.add_argument("--kv-heads", type=int, default=default.kv_heads)
    parser.add_argument("--vocab", type=int, default=default.vocab)
    parser.add_argument("--layers", type=int, default=default.layers)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=["rtn", "gptq"], default=["rtn", "gptq"])
    parser.add_argument("--gptq-blocks", type=int, default=2,
                        help="GPTQ runs on the first K blocks and is extrapolated from their times (K >= 1)")
    parser.add_argument("--rtn-blocks", type=int, default=0,
                        help="RTN likewise on the first K blocks (default 0: the whole model, measured)")
    parser.add_argument("--extrapolate-layers", type=int,
                        help="the depth the extrapolated entries stand for (default --layers; e.g. --layers 2 "
                             "--extrapolate-layers 32 times two 8B-shaped blocks without generating all 32)")
    parser.add_argument("--calib", default=str(CALIB))
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-shard-mb", type=float, default=512, help="largest output shard (MiB)")
    parser.add_argument("--tokenizer", default=str(REPO / ".cache/smollm2"),
                        help="folder whose tokenizer the checkpoint carries (default: the example model's)")
    parser.add_argument("--work", default=str(REPO / ".cache/scale"))
    parser.add_argument("--keep-outputs", action="store_true", help="keep the quantized checkpoints")
    parser.add_argument("--no-trace", action="store_true", help="do not run the quantizations under strace")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/scale-<shape>-<device>.json)")
    parser.add_argument("--quantize-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quantize_one:
        _quantize_one(json.loads(args.quantize_one))
        return {}
    if args.gptq_blocks < 1 or args.rtn_blocks < 0:
        parser.error("--gptq-blocks must be at least 1 and --rtn-blocks at least 0 (0 runs the whole model)")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    shape = Shape(args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, args.layers)
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").is_file() and tokenizer_dir == REPO / ".cache/smollm2":
        from nanoq_plugin.example_model import write_example_model

        write_example_model(tokenizer_dir)
    work = Path(args.work) / shape.name
    source = generate_source(work / "source", shape, tokenizer_dir, args.seed)
    source_dir = Path(source["directory"])
    max_shard_bytes = int(args.max_shard_mb * 2**20)
    limit = budget(shape, max_shard_bytes)
    depth = args.extrapolate_layers or shape.layers
    runs = []
    for method in args.methods:
        calibration = Path(args.calib) if method != "rtn" else None
        asked = args.gptq_blocks if method == "gptq" else args.rtn_blocks  # 0: the whole model, not extrapolated
        first = min(asked, shape.layers) or shape.layers
        directory = (source_dir if first == shape.layers
                     else first_blocks_view(source_dir, shape, first, work / f"first-{first}-blocks"))
        output = work / f"out-{method}-{first}-blocks"
        shutil.rmtree(output, ignore_errors=True)
        run = quantize_in_child(directory, output, method, args.device, calibration, args.calib_windows,
                                args.calib_seq_len, max_shard_bytes, not args.no_trace)
        run.update({"method": method, "scheme": "w4g128", "device": args.device, "blocks_run": first,
                    "output": str(output), "within_budget": _within(run, limit)})
        if calibration:
            run["calibration"] = {"file": str(calibration), "windows": args.calib_windows,
                                  "seq_len": args.calib_seq_len}
        print(json.dumps(run), flush=True)
        if not args.keep_outputs:
            shutil.rmtree(output, ignore_errors=True)
        runs.append(run)
        if asked and first < depth:
            runs.append(extrapolate(run, depth))
    report = {
        "provenance": provenance(args.device),
        "benchmark": "scale",
        "shape": {**asdict(shape), "name": shape.name, "params": shape.params(), "dtype": "bfloat16",
                  "block_bytes": shape.block_bytes()},
        "source": source,
        "max_shard_bytes": max_shard_bytes,
        "extrapolated_to_layers": depth,
        "budget": limit,
        "runs": runs,
        "note": "random weights (N(0, 0.02), norms 1): timings and memory are those of real weights of this shape; "
                "quality is not measured",
    }
    out = Path(args.out or REPO / f"benchmarks/results/scale-{shape.name}-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
