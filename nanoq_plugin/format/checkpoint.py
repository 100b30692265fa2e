"""Reading a Hugging Face safetensors folder lazily, and writing one atomically.

`SourceCheckpoint` opens every shard's header once (a corrupt or truncated file fails here, naming the
file; an index may name only shards inside the folder) and loads one tensor at a time, refusing a float
tensor with a NaN or infinite value. `CheckpointWriter` streams tensors into shards inside a staging dir
beside the destination and renames it into place only in `commit()`; any failure removes the staging dir.

A staging dir (or file) is named `.OUT.nanoq-tmp-XXXXXXXX` and its writer holds an exclusive `flock` on it
while it lives. The lock dies with the process however it ends (SIGKILL, power loss), so the next run on the
same OUT tells a leftover (lock free: removed) from a live writer (lock held: refused).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import NanoqError
from ..messages import user_logger
from .safetensors_stream import SafetensorsStream

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


def staging_logger() -> logging.Logger:
    """The `nanoq.staging` logger; given a stderr handler (`nanoq: message`) unless the application configured
    one, so that removing a killed run's leftovers is always said."""
    return user_logger("nanoq.staging")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path) -> dict:
    """Load a JSON object, naming the file on any error (NaN and Infinity, which are not JSON, included)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle, parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise NanoqError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise NanoqError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise NanoqError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise NanoqError(f"{path}: expected a JSON object")
    return data


def non_finite_path(data, where: str = "") -> str | None:
    """The JSON path (e.g. `modules.m.rel_error`) of the first NaN or infinite float in `data`, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "(top level)"
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = non_finite_path(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


# ---- staging: a dir or file beside OUT, locked while its writer lives ----

STAGING_MARK = ".nanoq-tmp-"
_held: dict[str, int] = {}  # staging path -> the descriptor holding its flock


def _staging_prefix(destination: Path) -> str:
    return f".{destination.name}{STAGING_MARK}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of `path` with its exclusive flock, or None when another open file holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _hold(path: Path) -> None:
    fd = _try_lock(path)
    if fd is None:  # a path this process just created: nobody else can hold it
        raise NanoqError(f"{path}: cannot lock the staging folder")
    _held[str(path)] = fd


def release_staging(path: Path) -> None:
    """Drop this process's lock on the staging dir or file `path` (after it is renamed or removed)."""
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def discard_staging(path: Path) -> None:
    """Remove the staging dir or file `path` and drop its lock."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    release_staging(path)


def clear_stale_staging(destination: Path) -> list[Path]:
    """Remove the staging dirs and files beside `destination` that killed runs left (their lock is free);
    returns them. NanoqError when a live run holds one: it is writing `destination` now."""
    pattern = re.compile(re.escape(_staging_prefix(destination)) + r"[a-z0-9_]+")
    removed = []
    try:
        candidates = sorted(destination.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing of ours there
        return removed
    for path in candidates:
        if not pattern.fullmatch(path.name) or str(path) in _held:  # not a staging, or this process's own
            continue
        try:
            fd = _try_lock(path)
        except OSError:  # removed meanwhile, or not ours to open
            continue
        if fd is None:
            raise NanoqError(f"{destination}: another nanoq run is writing it (its staging {path} is locked); "
                             "wait for it to finish or choose another OUT")
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        finally:
            os.close(fd)
        staging_logger().warning("removed %s, left behind by an interrupted run", path)
        removed.append(path)
    return removed


def _output_error(destination: Path, err: OSError) -> NanoqError:
    blocking = next((p for p in destination.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return NanoqError(f"{destination}: cannot be created: {blocking} is a file, not a folder")
    return NanoqError(f"{destination}: cannot be created ({err.strerror or err}: {err.filename or destination.parent})")


def make_staging_dir(destination: Path) -> Path:
    """A fresh, locked staging dir beside `destination` (same filesystem, so the final rename is atomic), after
    removing what killed runs left there.

    Refuses a `destination` that exists and is not an empty folder, so no user data is ever replaced.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise NanoqError(f"{destination}: already exists and is not empty (remove it or choose another OUT)")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_staging(destination)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(destination), dir=destination.parent))
    except OSError as err:
        raise _output_error(destination, err) from None
    try:
        _hold(staging)
    except BaseException:  # a signal between creating and locking it: not left for the next run to find
        discard_staging(staging)
        raise
    return staging


def make_staging_file(destination: Path) -> Path:
    """A fresh, locked, empty staging file beside the file `destination` (see `make_staging_dir`)."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_staging(destination)
        fd, name = tempfile.mkstemp(prefix=_staging_prefix(destination), dir=destination.parent)
    except OSError as err:
        raise _output_error(destination, err) from None
    os.close(fd)
    staging = Path(name)
    try:
        _hold(staging)
    except BaseException:
        discard_staging(staging)
        raise
    return staging


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def publish_dir(staging: Path, destination: Path) -> Path:
    """Give `staging` the usual umask permissions and rename it to `destination` (empty or absent).

    A `destination` that is itself a staging dir of this process stays locked under its new contents."""
    umask = _umask()
    for path in [staging, *staging.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    relock = str(destination) in _held
    if destination.exists():
        destination.rmdir()
    os.replace(staging, destination)
    release_staging(staging)
    if relock:
        release_staging(destination)
        _hold(destination)
    return destination


def publish_file(staging: Path, destination: Path) -> Path:
    """Give the staging file the usual umask permissions and rename it to `destination`."""
    os.chmod(staging, 0o666 & ~_umask())
    os.replace(staging, destination)
    release_staging(staging)
    return destination


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temp file in the same folder and rename it into place; NanoqError for a NaN or
    infinite value (which JSON cannot hold), naming the file and the key."""
    path = Path(path)
    bad = non_finite_path(data)
    if bad is not None:
        raise NanoqError(f"{path}: '{bad}' is not a finite number; refusing to write it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise NanoqError(f"{path}: cannot be written ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise NanoqError(f"{path}: cannot be written ({err.strerror or err})") from None
        raise


def first_non_finite(tensor: torch.Tensor) -> tuple[list[int], float] | None:
    """`(index, value)` of the first NaN or infinite element of a float tensor, or None when all are finite
    (or the tensor is not a float one). One min/max pass; the index is searched only when it fails."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    values = tensor if tensor.dtype.itemsize > 1 else tensor.to(torch.float32)  # float8 has no aminmax
    low, high = torch.aminmax(values)  # NaN propagates; ~20x faster than isfinite(...).all() on bfloat16
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    finite = torch.isfinite(values)
    index = (~finite).nonzero()[0].tolist()
    return index, float(values[tuple(index)])


def check_finite(tensor: torch.Tensor, name: str, where: str | os.PathLike) -> torch.Tensor:
    """`tensor`, or NanoqError naming `where`, the tensor and its first NaN / infinite element."""
    found = first_non_finite(tensor)
    if found is not None:
        index, value = found
        raise NanoqError(f"{where}: tensor '{name}' has a non-finite value ({value}) at index {index}")
    return tensor


def check_loaded_finite(state: dict[str, torch.Tensor], tensors: "SourceCheckpoint") -> None:
    """Check each float tensor of a loaded model's `state` that `tensors` stores (see `check_finite`)."""
    for name, tensor in state.items():
        if name in tensors:
            check_finite(tensor, name, tensors.file_of(name))


class SourceCheckpoint:
    """A Hugging Face model folder with safetensors weights, read lazily one tensor at a time."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise NanoqError(f"{self.directory}: not a directory")
        self.config = read_json(self.directory / "config.json")
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._listed = None
        for file in self._shard_files():
            self._index_file(file)
        if self._listed is not None:
            self._check_index()

    def _shard_path(self, index: Path, tensor: str, name) -> Path:
        """The shard file `name` that the index lists for `tensor`: a relative path inside the model folder."""
        if not isinstance(name, str) or not name:
            raise NanoqError(f"{index}: tensor '{tensor}' maps to {name!r}, not a shard file name")
        parts = Path(os.path.normpath(name)).parts
        if os.path.isabs(name) or not parts or parts[0] == ".." or "\0" in name:
            raise NanoqError(f"{index}: tensor '{tensor}' maps to {name!r}, outside the model folder "
                             "(shards must be files inside it)")
        return self.directory / os.path.normpath(name)

    def _check_index(self) -> None:
        index = self.directory / INDEX_NAME
        for tensor, file in self._listed.items():
            if self._file_of.get(tensor) != file:
                raise NanoqError(f"{index}: tensor '{tensor}' is listed in {file.name}, which does not store it")
        for tensor, file in self._file_of.items():
            if tensor not in self._listed:
                raise NanoqError(f"{file}: tensor '{tensor}' is not listed in {INDEX_NAME}")

    def _shard_files(self) -> list[Path]:
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise NanoqError(f"{index}: missing 'weight_map'")
            self._listed: dict[str, Path] = {}
            for tensor, name in weight_map.items():
                self._listed[tensor] = self._shard_path(index, tensor, name)
            files = sorted(set(self._listed.values()))
            for file in files:
                if not file.is_file():
                    raise NanoqError(f"{file}: listed in {INDEX_NAME} but missing")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise NanoqError(f"{self.directory}: no *.safetensors files (only safetensors checkpoints are read)")
        return files

    def _index_file(self, file: Path) -> None:
        if not file.is_file():
            raise NanoqError(f"{file}: not a file")
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
        """Load one tensor into memory (a copy, independent of the file); NanoqError naming the file, the
        tensor and the first bad index when a float tensor holds a NaN or an infinity.

        The tensor's bytes are read with `pread(2)` straight into its own memory: copying out of a memory map
        held the file's pages resident beside the copy while it ran (two copies at the peak: 2.1 GB for an 8B
        embedding table), and nothing stays mapped after, so memory does not grow with the number of layers.
        """
        file = self._file_of[self._require(name)]
        try:
            with safe_open(str(file), framework="pt", backend="pread") as handle:
                tensor = handle.get_tensor(name)
        except SafetensorError as err:
            raise NanoqError(f"{file}: tensor '{name}' cannot be read ({err})") from None
        except OSError as err:
            raise NanoqError(f"{file}: cannot read ({err.strerror or err})") from None
        return check_finite(tensor, name, file)

    def items(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` for `names`, loading each only when asked for."""
        for name in names:
            yield name, self.get(name)


class CheckpointWriter:
    """Streams tensors into safetensors shards of at most `max_shard_bytes` (a tensor larger than that has a
    shard to itself) in a temp dir beside `destination`; `commit()` renames it.

    Holds no tensor: each is written to its shard's file as it is added (`SafetensorsStream`).
    Use as a context manager: leaving the block without `commit()` removes the temp dir. A float tensor with a
    NaN or an infinity (e.g. a float16 scale of a weight beyond float16's range) is refused, not written.
    """

    def __init__(self, destination: str | os.PathLike, max_shard_bytes: int = 512 * 2**20) -> None:
        self.destination = Path(destination).resolve()
        self.staging = make_staging_dir(self.destination)
        self.max_shard_bytes = max_shard_bytes
        self._open: SafetensorsStream | None = None  # the shard being filled
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._open is not None:
            self._open.discard()
        discard_staging(self.staging)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; a shard is finished before a tensor that would overflow it and as soon as it is full."""
        if name in self._names:
            raise NanoqError(f"tensor '{name}' written twice")
        tensor = tensor.detach().to("cpu")
        found = first_non_finite(tensor)
        if found is not None:
            raise NanoqError(f"{self.destination}: tensor '{name}' would be stored with a non-finite value "
                             f"({found[1]}) at index {found[0]}: its source values exceed what "
                             f"{str(tensor.dtype).removeprefix('torch.')} holds; nothing written")
        size = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.bytes and self._open.bytes + size > self.max_shard_bytes:
            self._finish_shard()
        if self._open is None:
            self._open = SafetensorsStream(self.staging / f"shard-{len(self._shards):05d}.tmp")
        try:
            self._open.add(name, tensor)
        except OSError as err:  # e.g. the disk is full
            raise NanoqError(f"{self._open.path}: cannot write ({err.strerror or err})") from None
        self._names.add(name)
        self.total_bytes += size
        if self._open.bytes >= self.max_shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._open is None:
            return
        shard, self._open = self._open, None
        try:
            shard.finish(metadata={"format": "pt"})
        except OSError as err:
            raise NanoqError(f"{shard.path}: cannot write ({err.strerror or err})") from None
        self._shards.append((shard.path, shard.names))

    def commit(self, json_files: dict[str, dict], copy_files: list[Path] = ()) -> Path:
        """Write the last shard, the index, `json_files` (name -> object) and copies; rename into place."""
        self._finish_shard()
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
