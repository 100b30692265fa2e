"""The search's evaluation cache: one JSON line per evaluation, appended and flushed as soon as it is done.

Every record carries the fingerprint of the evaluation settings (model files, text slice, question suite,
window counts, dtype, library versions); a record is reused only under the same fingerprint, so one cache
file can serve several settings and a changed setting never reuses a stale score. An interrupted search
loses at most the evaluation in progress: a truncated last line is ignored (and overwritten by the next
append); a malformed line elsewhere stops with the file and line number.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import NanoqError


def fingerprint(settings: dict) -> str:
    """A short stable hash of a JSON-serialisable settings dict."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex, first 16 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class EvalCache:
    """Records `{"settings": fp, "kind": str, "label": str, ...}` in a JSONL file, looked up by (kind, label)."""

    def __init__(self, path: str | os.PathLike, settings: dict) -> None:
        self.path = Path(path)
        self.settings = fingerprint(settings)
        self._records: dict[tuple[str, str], dict] = {}
        self._valid_bytes = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    if last:  # an append cut short by an interrupt
                        break
                    raise NanoqError(f"{self.path}:{number}: not a valid cache record (delete the file to "
                                     "start the search afresh)") from None
                if not isinstance(record, dict) or not {"settings", "kind", "label"} <= set(record):
                    raise NanoqError(f"{self.path}:{number}: not a cache record (no settings/kind/label)")
                if record["settings"] == self.settings:
                    self._records[(record["kind"], record["label"])] = record
            offset += len(line) + (0 if last else 1)
            self._valid_bytes = offset

    def get(self, kind: str, label: str) -> dict | None:
        """The record of `(kind, label)` under the current settings, or None."""
        return self._records.get((kind, label))

    def put(self, kind: str, label: str, values: dict) -> dict:
        """Append one record (fsync'd) and return it."""
        record = {"settings": self.settings, "kind": kind, "label": label, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "r+b" if self.path.exists() else "wb") as handle:
            handle.seek(self._valid_bytes)
            handle.truncate()
            if self._valid_bytes and not self._ends_with_newline(handle):
                handle.write(b"\n")
            handle.write(json.dumps(record).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            self._valid_bytes = handle.tell()
        self._records[(kind, label)] = record
        return record

    def _ends_with_newline(self, handle) -> bool:
        handle.seek(self._valid_bytes - 1)
        ends = handle.read(1) == b"\n"
        handle.seek(self._valid_bytes)
        return ends
