"""Reading a Hugging Face safetensors folder lazily, and writing one atomically.

`SourceCheckpoint` opens every shard's header once (a corrupt or truncated file fails here, naming the
file) and loads one tensor at a time. `CheckpointWriter` streams tensors into shards inside a temp dir
beside the destination and renames it into place only in `commit()`; any failure removes the temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import NanoqError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from the source so the output is a complete, servable folder.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_json(path: Path) -> dict:
    """Load a JSON object, naming the file on any error."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise NanoqError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NanoqError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise NanoqError(f"{path}: expected a JSON object")
    return data


def make_staging_dir(destination: Path) -> Path:
    """A fresh temp dir beside `destination` (same filesystem, so the final rename is atomic).

    Refuses a `destination` that exists and is not an empty folder, so no user data is ever replaced.
    """
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise NanoqError(f"{destination}: already exists and is not empty (remove it or choose another OUT)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.nanoq-tmp-", dir=destination.parent))


def publish_dir(staging: Path, destination: Path) -> Path:
    """Give `staging` the usual umask permissions and rename it to `destination` (empty or absent)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if destination.exists():
        destination.rmdir()
    os.replace(staging, destination)
    return destination


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temp file in the same folder and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SourceCheckpoint:
    """A Hugging Face model folder with safetensors weights, read lazily one tensor at a time."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NanoqError(f"{self.directory}: not a directory")
        self.config = read_json(self.directory / "config.json")
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in self._shard_files():
            self._index_file(file)

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise NanoqError(f"{index}: missing 'weight_map'")
            files = sorted({self.directory / name for name in weight_map.values()})
            for file in files:
                if not file.exists():
                    raise NanoqError(f"{file}: listed in {INDEX_NAME} but missing")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise NanoqError(f"{self.directory}: no *.safetensors files (only safetensors checkpoints are read)")
        return files

    def _index_file(self, file: Path) -> None:
        try:
            if file.stat().st_size < 8:
                raise NanoqError(f"{file}: truncated safetensors file ({file.stat().st_size} bytes)")
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    info = handle.get_slice(name)
                    dtype = _DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise NanoqError(f"{file}: tensor '{name}' has unsupported dtype {info.get_dtype()}")
                    if name in self._file_of:
                        raise NanoqError(f"{file}: tensor '{name}' also stored in {self._file_of[name].name}")
                    self._meta[name] = (tuple(info.get_shape()), dtype)
                    self._file_of[name] = file
        except SafetensorError as err:
            raise NanoqError(f"{file}: corrupt or truncated safetensors file ({err})") from None
        except OSError as err:
            raise NanoqError(f"{file}: cannot read ({err})") from None

    def keys(self) -> list[str]:
        """All tensor names, in sorted order."""
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        """The shard file that stores `name`."""
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name` read from the header (no data loaded)."""
        return self._meta[self._require(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of `name` read from the header (no data loaded)."""
        return self._meta[self._require(name)][1]

    def _require(self, name: str) -> str:
        if name not in self._file_of:
            raise NanoqError(f"{self.directory}: tensor '{name}' not found in the checkpoint")
        return name

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (a copy, independent of the file).

        The file is opened (memory-mapped) for this one read and closed again, so the mapped pages of
        tensors already processed do not stay resident: memory does not grow with the number of layers.
        """
        file = self._file_of[self._require(name)]
        try:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name).clone()
        except SafetensorError as err:
            raise NanoqError(f"{file}: tensor '{name}' cannot be read ({err})") from None

    def items(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` for `names`, loading each only when asked for."""
        for name in names:
            yield name, self.get(name)


class CheckpointWriter:
    """Streams tensors into safetensors shards in a temp dir beside `destination`; `commit()` renames it.

    Memory held is bounded by `max_shard_bytes` (one shard's worth of tensors), whatever the model size.
    Use as a context manager: leaving the block without `commit()` removes the temp dir.
    """

    def __init__(self, destination: str | os.PathLike, max_shard_bytes: int = 512 * 2**20) -> None:
        self.destination = Path(destination).resolve()
        self.staging = make_staging_dir(self.destination)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes a shard when the queue reaches `max_shard_bytes`."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise NanoqError(f"tensor '{name}' written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.staging / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def commit(self, json_files: dict[str, dict], copy_files: list[Path] = ()) -> Path:
        """Write the last shard, the index, `json_files` (name -> object) and copies; rename into place."""
        self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for number, (path, names) in enumerate(self._shards, start=1):
            final = SINGLE_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.staging / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.staging / INDEX_NAME, index)
        for name, data in json_files.items():
            write_json(self.staging / name, data)
        for file in copy_files:
            shutil.copy2(file, self.staging / Path(file).name)
        return publish_dir(self.staging, self.destination)
