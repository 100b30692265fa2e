"""`nanoq export gguf DIR OUT.gguf --type f16|q8_0|q4_0`: a float Hugging Face folder as one GGUF file for
llama.cpp and Ollama, written with the `gguf` package's writer.

| tensor                                   | f16  | q8_0 | q4_0 | note                                      |
|------------------------------------------|------|------|------|-------------------------------------------|
| 1-D (norms, biases, Qwen3 q/k norms)     | F32  | F32  | F32  | as llama.cpp keeps them                   |
| output matrix (`output.weight`, or       | F16  | Q8_0 | Q8_0 | llama.cpp's Q4_0 gives it Q6_K, which     |
| `token_embd.weight` when tied)           |      |      |      | gguf-py cannot write: the next finer type |
| every other 2-D weight                   | F16  | Q8_0 | Q4_0 | a row not a multiple of 32 falls back to  |
|                                          |      |      |      | F16, as in llama.cpp                      |

Q8_0: blocks of 32 along the input dimension, int8 codes and one f16 scale (absmax / 127), 8.5 bits per
weight. Q4_0: blocks of 32, 4-bit codes in [-8, 7] and one f16 scale, symmetric, 4.5 bits per weight.
Quantization is gguf-py's (`gguf.quants.quantize`, numpy, the reference of llama.cpp's formats).

The families (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, OLMo 2, Granite), their hyperparameter keys and their
tensor transforms (Llama's q/k row permutation to llama.cpp's interleaved rotary pairs, Gemma's `1 + w`
norms) are `gguf_arch`'s, each as llama.cpp's convert_hf_to_gguf writes it. The tokenizer (a SentencePiece
model or a byte-level BPE) and chat template go in the metadata (`gguf_vocab`).

Tensors are streamed: the tensor table is written from the headers, then each tensor is loaded, converted,
written and dropped; the file is written beside OUT under a temp name and renamed when complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import NanoqError
from ..format.checkpoint import SourceCheckpoint, discard_staging, make_staging_file, publish_file
from ..format.expected_tensors import check_float_tensors
from .gguf_arch import Family, family_of
from .gguf_vocab import SENTENCEPIECE_FILE, read_sentencepiece_vocab, read_vocab

TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_TYPE = "f16"
BLOCK = 32  # elements per Q8_0 / Q4_0 block


@dataclass
class GgufExport:
    """What was written: the file, its size, its architecture and how many tensors got each GGML type."""

    path: Path
    file_bytes: int
    architecture: str
    tensor_types: dict[str, int]
    params: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.params


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q_proj / k_proj `[heads * head_dim, in]` from rotate-half to interleaved pairs: within each
    head, output row 2i is input row i and row 2i+1 is input row i + head_dim/2 (llama.cpp's `permute`)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_hyperparameters(writer, config: dict, family: Family, name: str, file_type: int) -> None:
    import gguf

    writer.add_name(name)
    family.hyperparameters(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass(frozen=True)
class _Planned:
    source: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType


def _plan(source: SourceCheckpoint, family: Family, requested: str) -> list[_Planned]:
    import gguf

    config = source.config
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == family.gguf_name)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in source
    wanted = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "q4_0": gguf.GGMLQuantizationType.Q4_0}[requested]
    planned = []
    for tensor in source.keys():
        if tensor == "lm_head.weight" and tied:
            continue  # llama.cpp reads the tied head from token_embd
        name = names.get_name(tensor, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise NanoqError(f"{source.file_of(tensor)}: tensor '{tensor}' has no GGUF name for {family.gguf_name}")
        shape = source.shape(tensor)
        if len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif shape[-1] % BLOCK:
            qtype = gguf.GGMLQuantizationType.F16
        elif requested == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
            qtype = gguf.GGMLQuantizationType.Q8_0
        else:
            qtype = wanted
        planned.append(_Planned(tensor, name, shape, qtype))
    return sorted(planned, key=_write_order)


def _write_order(item: _Planned) -> tuple[int, str]:
    """token_embd, then blk.0.* ... blk.N.*, then output_norm and output (llama.cpp's order)."""
    if item.name.startswith("blk."):
        return int(item.name.split(".")[1]), item.name
    return (-1 if item.name.startswith("token_embd") else 1 << 30), item.name


F16_MAX = 65504.0
# Largest magnitude each type stores: F16 itself; Q8_0 / Q4_0 keep an F16 scale of amax / 127 and amax / 8.
_LIMITS = {"F16": F16_MAX, "Q8_0": F16_MAX * 127, "Q4_0": F16_MAX * 8}


def _check_range(source: SourceCheckpoint, item: _Planned, data: np.ndarray) -> None:
    """NanoqError naming the tensor when its values exceed what its GGML type holds (they would be stored
    as infinities)."""
    limit = _LIMITS.get(item.qtype.name)
    if limit is None or not data.size:
        return
    amax = float(np.abs(data).max())
    if amax > limit:
        raise NanoqError(f"{source.file_of(item.source)}: tensor '{item.source}' has values up to {amax:.4g}, beyond "
                         f"what GGUF {item.qtype.name} holds (at most {limit:.6g}); nothing written")


def _tensor_data(source: SourceCheckpoint, item: _Planned, config: dict, family: Family) -> np.ndarray:
    import gguf

    data = source.get(item.source).to(torch.float32).numpy()
    if family.norm_offset and item.source.endswith("norm.weight"):
        data = data + np.float32(family.norm_offset)  # Gemma's x * (1 + w) as llama.cpp's x * w
    _check_range(source, item, data)
    if family.permute_qk and item.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config["num_attention_heads"] if "attn_q" in item.name else config.get("num_key_value_heads") or config["num_attention_heads"]
        data = llama_permute(data, heads)
    if item.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if item.qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data), item.qtype)


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, tensor_type: str = DEFAULT_TYPE,
                progress: bool = True) -> GgufExport:
    """Write the float model in `model_dir` to the GGUF file `output` (must not exist) with 2-D weights of
    `tensor_type` (see the module table); returns what was written."""
    import gguf

    if tensor_type not in TYPES:
        raise NanoqError(f"--type {tensor_type!r}: expected one of {', '.join(TYPES)}")
    source = SourceCheckpoint(model_dir)
    where = str(source.directory / "config.json")
    config = source.config
    family = family_of(config, where)
    check_float_tensors(source)
    output = Path(output).resolve()
    if output.exists():
        raise NanoqError(f"{output}: already exists (remove it or choose another OUT)")
    if output.suffix != ".gguf":
        raise NanoqError(f"{output}: the output of `nanoq export gguf` is a file named *.gguf")
    if family.sentencepiece and (source.directory / SENTENCEPIECE_FILE).is_file():
        vocab = read_sentencepiece_vocab(source.directory, config["vocab_size"], family.verbatim_added_tokens)
    else:
        vocab = read_vocab(source.directory, config["vocab_size"])
    planned = _plan(source, family, tensor_type)

    writer = gguf.GGUFWriter(path=None, arch=family.gguf_name)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[tensor_type]
    _write_hyperparameters(writer, config, family, source.directory.name, file_type)
    vocab.add_to(writer)
    for item in planned:
        if item.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), int(np.prod(item.shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, item.qtype)
            writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=item.qtype)

    temp = make_staging_file(output)
    try:
        writer.write_header_to_file(temp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in tqdm(planned, desc=f"gguf {tensor_type}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_tensor_data(source, item, config, family))
        writer.close()
        publish_file(temp, output)
    except BaseException:
        writer.close()
        discard_staging(temp)
        raise
    counts = Counter(item.qtype.name for item in planned)
    params = sum(int(np.prod(item.shape)) for item in planned)
    return GgufExport(output, output.stat().st_size, family.gguf_name, dict(counts), params)
