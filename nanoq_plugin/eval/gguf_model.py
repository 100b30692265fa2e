"""`nanoq eval FILE.gguf`: a GGUF file loaded with transformers' GGUF reader, and its storage totals."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NanoqError

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def load_gguf(path: Path, dtype: torch.dtype):
    """`(model, tokenizer)` of a GGUF file: transformers dequantizes every tensor to `dtype` on load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise NanoqError(f"{path}: file not found")
    read_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NanoqError(f"{path}: transformers cannot load this GGUF file ({first_line})") from None
    return model.eval(), tokenizer


def read_gguf(path: Path):
    """The parsed GGUF file (gguf-py's reader); NanoqError naming it when it cannot be parsed."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # the reader fails in many ways (struct, numpy, value errors) on a corrupt file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise NanoqError(f"{path}: not a readable GGUF file ({reason})") from None


def gguf_storage(path: Path) -> dict:
    """Storage totals in the manifest's terms: `original_bytes` counts every weight at 16 bits,
    `stored_bytes` the tensor data in the file, `quantized_bits_per_weight` the bits per weight of the
    2-D tensors (the matrices a `--type` applies to)."""
    reader = read_gguf(path)
    params = stored = matrix_params = matrix_bytes = 0
    for tensor in reader.tensors:
        count, size = int(tensor.n_elements), int(tensor.n_bytes)
        params, stored = params + count, stored + size
        if len([d for d in tensor.shape if d > 1]) >= 2:
            matrix_params, matrix_bytes = matrix_params + count, matrix_bytes + size
    original = 2 * params
    return {"original_bytes": original, "stored_bytes": stored, "ratio": round(original / stored, 3),
            "bits_per_weight": round(8 * stored / params, 3),
            "quantized_bits_per_weight": round(8 * matrix_bytes / matrix_params, 3), "file_bytes": path.stat().st_size,
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}
