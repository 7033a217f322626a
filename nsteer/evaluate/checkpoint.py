"""A JSONL checkpoint of finished cells, so an interrupted sweep or evaluation resumes without redoing them.

Each finished cell is one line, written with a single ``write`` on a file opened for appending and then fsync'd.
A run killed mid-write leaves at most one partial last line; reading skips it, and the next append starts on a
fresh line, so the cell is simply done again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nsteer.errors import EvaluationError, FileError
from nsteer.fileio import parse_json, path_kind

# One finished cell's line: its answers (a unit's rows x up to 8192 tokens each) stay far below this.
MAX_RECORD_BYTES = 256 << 20


def cell_key(**parts: Any) -> str:
    """A stable key for a cell from everything that determines its answers (JSON-serializable parts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_checkpoint(path: Path) -> dict[str, dict[str, Any]]:
    """The finished cells in ``path`` by key (empty when the file does not exist); broken lines are skipped."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "nothing":
        return {}
    if kind != "a file":  # a folder would fail with a traceback, a pipe would block forever
        raise FileError(f"The checkpoint {path} is {kind}, not a file: move it away, or give another output folder.")
    finished: dict[str, dict[str, Any]] = {}
    with path.open("rb") as stream:
        while line := stream.readline(MAX_RECORD_BYTES + 1):
            if len(line) > MAX_RECORD_BYTES:  # not a record nsteer wrote: skip the rest of it, keep reading
                while line and not line.endswith(b"\n"):
                    line = stream.readline(MAX_RECORD_BYTES)
                continue
            if not line.endswith(b"\n"):
                break  # a partial last line from an interrupted write
            try:
                record = parse_json(line)
            except (ValueError, UnicodeDecodeError):  # a broken line (any cause) only means the cell is done again
                continue
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                finished[record["key"]] = record
    return finished


def append_checkpoint(path: Path, record: Mapping[str, Any]) -> None:
    """Append one finished cell (a mapping with a ``key``) as one line, atomically with respect to readers."""
    if not isinstance(record.get("key"), str):
        raise EvaluationError("A checkpoint record needs a string 'key'.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = (json.dumps(dict(record), sort_keys=True, allow_nan=True) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        if size and _last_byte(path, size) != b"\n":
            payload = b"\n" + payload  # close a partial line left by an interrupted run
        written = 0
        while written < len(payload):  # a regular file takes it in one write but for a full disk or a signal
            written += os.write(descriptor, payload[written:])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(size - 1)
        return stream.read(1)
