"""`nanoq eval`: perplexity (and ratio to a base), logit cosine, greedy samples; writes the summary and card."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..errors import NanoqError
from ..format.checkpoint import check_loaded_finite, write_json
from ..format.validate import load_nano_checkpoint
from ..quantizers.architectures import open_float_source
from .gguf_model import gguf_storage, load_gguf
from .model_card import render_model_card
from .perplexity import evaluate_perplexity
from .quantized_model import load_quantized_model
from .routing import RoutingRecorder, experts_modules, routing_agreement
from .samples import greedy_samples

SUMMARY_NAME = "eval_summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _load_model(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.eval()


def _read_text(text_file: str) -> str:
    """The UTF-8 text of `--text`; NanoqError for a missing, unreadable or non-UTF-8 file."""
    path = Path(text_file)
    if not path.is_file():
        raise NanoqError(f"--text {text_file}: file not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise NanoqError(f"--text {text_file}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start})") from None


def _check_fits(config: dict, where: str, ctx: int | None) -> None:
    """NanoqError when windows of `ctx` tokens exceed the model's max_position_embeddings."""
    positions = config.get("max_position_embeddings")
    if ctx is not None and isinstance(positions, int) and ctx > positions:
        raise NanoqError(f"--ctx {ctx} exceeds the model's max_position_embeddings {positions} ({where})")


def run_eval(
    checkpoint_dir: str,
    base_dir: str | None = None,
    text_file: str | None = None,
    ctx: int = 512,
    stride: int = 256,
    max_windows: int | None = None,
    json_out: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    scoring: str = "dequantized",
) -> dict:
    """Evaluate the nano checkpoint in `checkpoint_dir`, or a `.gguf` file; returns the summary, which is also
    written to `eval_summary.json` with a model card `README.md` in the checkpoint (for a GGUF file: to
    `NAME.eval_summary.json` beside it, no card).

    `scoring` (nano checkpoints): `dequantized` scores the weight-only modules with their weights dequantized
    once, `kernels` through the serving kernels (`eval.quantized_model`; the same numbers, slower on a CPU
    where a scheme has no fast kernel)."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    gguf_file = Path(checkpoint_dir) if Path(checkpoint_dir).suffix == ".gguf" else None
    checkpoint = None if gguf_file else load_nano_checkpoint(checkpoint_dir)
    text = _read_text(text_file) if text_file is not None else None
    if base_dir is not None and not (Path(base_dir) / "config.json").is_file():
        raise NanoqError(f"--base {base_dir}: no config.json (not a Hugging Face model folder)")
    if checkpoint is not None:
        _check_fits(checkpoint.tensors.config, str(checkpoint.directory / "config.json"), ctx if text else None)
    base = None
    if base_dir is not None:
        base, _ = open_float_source(base_dir, instead="compare with the float model it was made from")
    if gguf_file is not None:
        model, tokenizer = load_gguf(gguf_file, dtype)
        models, storage = {"quantized": model}, gguf_storage(gguf_file)
        scored_as = {"mode": "gguf", "note": "transformers dequantizes every tensor on load"}
        summary_path = gguf_file.with_name(gguf_file.stem + "." + SUMMARY_NAME)
    else:
        if not any((checkpoint.directory / name).is_file() for name in TOKENIZER_FILES):
            raise NanoqError(f"{checkpoint.directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                             "quantize from a folder that has its tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory)
        model, scored_as = load_quantized_model(checkpoint, dtype, scoring)
        models, storage = {"quantized": model}, checkpoint.manifest["totals"]
        summary_path = checkpoint.directory / SUMMARY_NAME
    if gguf_file is not None:
        _check_fits(models["quantized"].config.to_dict(), str(gguf_file), ctx if text else None)
    if base is not None:
        vocab, base_vocab = models["quantized"].config.vocab_size, base.config.get("vocab_size")
        if base_vocab != vocab:
            raise NanoqError(f"--base {base_dir}: vocab_size {base_vocab}, the evaluated model has {vocab}: "
                             "compare with the model it was made from")
        models["base"] = _load_model(base.directory, dtype)
        check_loaded_finite(models["base"].state_dict(), base)

    summary: dict = {
        "checkpoint": str((gguf_file or checkpoint.directory).resolve()),
        "base": str(Path(base_dir).resolve()) if base_dir else None,
        "text": str(text_file) if text_file else None,
        "dtype": str(dtype).removeprefix("torch."),
        "scoring": scored_as,
        "storage": storage,
        "written": [str(summary_path)] + ([] if gguf_file else [str(checkpoint.directory / "README.md")]),
    }
    if text_file is not None:
        token_ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if token_ids.numel() < 2:
            raise NanoqError(f"--text {text_file}: {token_ids.numel()} token(s), perplexity needs at least 2")
        # a mixture of experts compared with its base: which experts each token goes to, in both models
        routed = base_dir is not None and bool(experts_modules(models["quantized"]))
        with RoutingRecorder(models["quantized"] if routed else None) as ours, \
                RoutingRecorder(models["base"] if routed else None) as theirs:
            result = evaluate_perplexity(
                models, token_ids, ctx, stride, max_windows, reference="base" if base_dir else None, progress=progress
            )
        for name, value in result.perplexity.items():
            if not math.isfinite(value):
                raise NanoqError(f"{gguf_file or checkpoint.directory}: the {name} model's perplexity on "
                                 f"{text_file} is {value}, not a finite number; nothing written")
        summary["protocol"] = {"ctx": ctx, "stride": stride, "windows": result.windows,
                               "scored_tokens": result.scored_tokens, "max_windows": max_windows}
        summary["perplexity"] = result.perplexity["quantized"]
        summary["base_perplexity"] = result.perplexity.get("base")
        summary["ppl_ratio"] = summary["perplexity"] / summary["base_perplexity"] if base_dir else None
        summary["logit_cosine"] = result.last_logit_cosine.get("quantized")
        if routed:
            summary["routing_agreement"] = routing_agreement(theirs, ours)
    quantized_samples = greedy_samples(models["quantized"], tokenizer)
    base_samples = greedy_samples(models["base"], tokenizer) if base_dir else None
    summary["samples"] = []
    for i, sample in enumerate(quantized_samples):
        entry = {"prompt": sample["prompt"], "quantized": sample["text"]}
        if base_samples:
            entry["base"] = base_samples[i]["text"]
            entry["same_tokens"] = base_samples[i]["token_ids"] == sample["token_ids"]
        summary["samples"].append(entry)
    summary["seconds"] = round(time.perf_counter() - start, 1)

    card = render_model_card(checkpoint.manifest, summary) if checkpoint is not None else None
    if json_out:  # first: a --json path that cannot be written leaves the checkpoint as it was
        try:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NanoqError(f"--json {json_out}: cannot create its folder ({err.strerror}: {err.filename})") from None
        write_json(Path(json_out), summary)
    write_json(summary_path, summary)
    if card is not None:
        card_tmp = checkpoint.directory / ".README.md.tmp"
        card_tmp.write_text(card, encoding="utf-8")
        card_tmp.replace(checkpoint.directory / "README.md")
    return summary
