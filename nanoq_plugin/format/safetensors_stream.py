"""One safetensors file written tensor by tensor, holding none of them in memory.

Why: the format puts a header with every tensor's offsets before the data, so `safetensors.save_file` needs all of
a file's tensors at once, and a writer of shards held a whole shard (512 MiB by default) in memory while it
filled, beside the model's block being quantized. Here each tensor's bytes go to a data file beside the shard as
soon as the tensor is added; `finish` writes the header and copies the data after it (one more sequential write
of the shard, against holding it). The file is the format's own layout (8-byte little-endian header length, the
JSON header padded with spaces to 8 bytes, the data), so safetensors reads it like one it wrote.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ..errors import NanoqError

# safetensors' names of the dtypes a checkpoint holds
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
COPY_CHUNK = 16 * 2**20  # bytes per read when the data is copied behind the header


def header_bytes(entries: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """What a safetensors file holds before its data: the 8-byte little-endian length, then the JSON header of
    `entries` (name -> dtype, shape, data_offsets) and `metadata`, padded with spaces so that the data starts
    8-byte aligned, as safetensors writes it."""
    header = {"__metadata__": metadata, **entries} if metadata else entries
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsStream:
    """A safetensors file at `path`, made by `add` (each tensor written to `<path>.data` at once) and `finish`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self.bytes = 0  # tensor data written so far

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (any shape, a dtype of DTYPE_NAMES, on the CPU) under `name`."""
        if tensor.dtype not in DTYPE_NAMES:
            raise NanoqError(f"tensor '{name}': safetensors has no dtype {str(tensor.dtype).removeprefix('torch.')}")
        if name in self._header:
            raise NanoqError(f"tensor '{name}' written twice")
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._data.write(raw.numpy().data)
        self._header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.bytes, self.bytes + raw.numel()]}
        self.bytes += raw.numel()

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the file (header, then the data) and remove the data file; returns `path`."""
        self._data.close()
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(header_bytes(self._header, metadata))
            shutil.copyfileobj(data, out, COPY_CHUNK)
        self._data_path.unlink()
        return self.path

    def discard(self) -> None:
        """Close and remove what was written (the data file; `path` if finished)."""
        self._data.close()
        self._data_path.unlink(missing_ok=True)
