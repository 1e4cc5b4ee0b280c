"""Results that survive a crash: whole JSON lines only, and a restart knows which ids are done.

Two layouts, one record per line (``{"id", "answer", ...}`` or ``{"id", "error"}``):

* :class:`AppendWriter` (one machine): one JSONL file, opened for appending. Lines are buffered and written
  in chunks (every ``flush_rows`` rows or ``flush_seconds``), each chunk with one ``write`` and then
  ``fsync``. A run killed mid-write can leave only the tail of one chunk; the next run cuts the file back
  to its last newline before it appends. An exclusive ``flock`` keeps a second run off the same file.
* :class:`ShardWriter` (Ray): a folder of ``part-*.jsonl`` shards, each written under a hidden temporary
  name, fsynced and renamed into place once complete, so a shard is either whole or absent.

Both read what is there first (:meth:`done_keys`): a restarted job skips those ids. :func:`read_results`
reads either layout (the first record of an id wins: a retried Ray task may have written a row twice,
the same row, since answers are deterministic for a seed).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from visualglm.batch.inputs import id_key, valid_id

SHARD_GLOB = "part-*.jsonl"


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _record_key(text: bytes, where: str) -> str:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not valid_id(record.get("id")):
        raise ValueError(f"{where}: not a batch output line (a JSON object with an id): is this the right "
                         "output path?")
    return id_key(record["id"])


class _Buffered:
    """Rows buffered until ``flush_rows`` of them or ``flush_seconds`` since the last flush."""

    def __init__(self, flush_rows: int, flush_seconds: float) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be at least 1, got {flush_rows}")
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._pending: list[bytes] = []
        self._since = time.monotonic()
        self.written = 0  # rows made durable by this writer

    def write(self, record: dict) -> None:
        self._pending.append(encode_record(record))
        if len(self._pending) >= self.flush_rows or time.monotonic() - self._since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._commit(b"".join(self._pending))
            self.written += len(self._pending)
            self._pending = []
        self._since = time.monotonic()

    def _commit(self, data: bytes) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class AppendWriter(_Buffered):
    """Appends records to the JSONL file ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path, *, flush_rows: int = 64, flush_seconds: float = 5.0) -> None:
        super().__init__(flush_rows, flush_seconds)
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"output '{self.path}' is a folder: without --ray the output is one JSONL file")
        if not self.path.parent.is_dir():
            raise ValueError(f"output folder '{self.path.parent}' does not exist")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"another batch run is writing '{self.path}'") from None
        try:
            self._done = self._read_done()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_done(self) -> set[str]:
        with open(self._fd, "rb", closefd=False) as handle:
            data = handle.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # the torn tail of a chunk whose write was interrupted: those rows run again
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            data = data[:end]
        done = set()
        for number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                done.add(_record_key(line, f"{self.path}:{number}"))
        return done

    def done_keys(self) -> set[str]:
        """Ids (as :func:`~visualglm.batch.inputs.id_key`) already in the file when it was opened."""
        return set(self._done)

    def _commit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


class ShardWriter(_Buffered):
    """Writes records as shards in the folder ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path, *, flush_rows: int = 1000, flush_seconds: float = 30.0) -> None:
        super().__init__(flush_rows, flush_seconds)
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"output '{self.path}' is a file: with --ray the output is a folder of shards")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".part-*.tmp"):  # shards a killed run never finished
            stale.unlink(missing_ok=True)
        self._run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self._shards = 0
        self._done = shard_keys(self.path)
        self._closed = False

    def done_keys(self) -> set[str]:
        return set(self._done)

    def _commit(self, data: bytes) -> None:
        self._shards += 1
        name = f"part-{self._run}-{self._shards:05d}.jsonl"
        temporary = self.path / f".{name}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path / name)
        directory = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flush()


def shard_keys(folder: Path) -> set[str]:
    done = set()
    for shard in sorted(folder.glob(SHARD_GLOB)):
        for number, line in enumerate(shard.read_bytes().splitlines(), 1):
            if line.strip():
                done.add(_record_key(line, f"{shard}:{number}"))
    return done


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every record of a batch output (a JSONL file or a folder of shards), by id key; the first record
    of an id wins."""
    path = Path(path)
    files = sorted(path.glob(SHARD_GLOB)) if path.is_dir() else [path]
    results: dict[str, dict[str, Any]] = {}
    for file in files:
        for number, line in enumerate(file.read_bytes().splitlines(), 1):
            if line.strip():
                key = _record_key(line, f"{file}:{number}")
                results.setdefault(key, json.loads(line))
    return results
