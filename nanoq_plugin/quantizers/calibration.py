"""Calibration data: fixed-length token windows from a text file, tokenized with the model's tokenizer, or
(`--calib self`) sampled from the model itself for users who have no data."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NanoqError


SELF = "self"  # --calib self
SELF_BATCH = 16


def self_generated_windows(model_dir: str | Path, windows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`[windows, seq_len]` int64 token windows sampled from the float model itself (temperature 1, from the BOS
    token, end-of-sequence ignored), in batches of SELF_BATCH. This loads the whole float model once, for
    generation only (quantization itself still reads one block at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise NanoqError(f"--calib self: the tokenizer of {model_dir} has neither a BOS nor an EOS token to start from")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    batches = []
    for first in range(0, windows, SELF_BATCH):
        count = min(SELF_BATCH, windows - first)
        prompt = torch.full((count, 1), start, dtype=torch.int64)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 pad_token_id=start)
        batches.append(out[:, :seq_len])
    return torch.cat(batches)


def calibration_windows(model_dir: str | Path, text_file: str | Path, windows: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """`windows` token windows `[windows, seq_len]` (int64) drawn at seeded random offsets from `text_file`
    (or sampled from the model when `text_file` is `"self"`)."""
    from transformers import AutoTokenizer

    if str(text_file) == SELF:
        return self_generated_windows(model_dir, windows, seq_len, seed)
    path = Path(text_file)
    if not path.is_file():
        raise NanoqError(f"--calib {path}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() < seq_len + 1:
        raise NanoqError(f"--calib {path}: {ids.numel()} tokens, need at least {seq_len + 1} for one window")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (windows,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
