"""Calibration data: fixed-length token windows from a text file, tokenized with the model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NanoqError


def calibration_windows(model_dir: str | Path, text_file: str | Path, windows: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """`windows` token windows `[windows, seq_len]` (int64) drawn at seeded random offsets from `text_file`."""
    from transformers import AutoTokenizer

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
