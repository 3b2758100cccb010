"""The API's audit log: append-only JSON lines, each hash-chained to the line before.

Every entry carries `prev`, the sha256 of the previous line's bytes exactly as written
(`GENESIS` for the first), and `seq`, its 1-based line number. Editing, removing,
inserting or reordering a line breaks the chain at the next line, which `verify` names.
Removing lines from the end leaves a shorter, valid chain: the file alone cannot show
that, so the head (`AuditLog.head`, the sha256 of the last line) is also logged with
every entry, for a log collector to keep elsewhere.

The file is opened with O_APPEND and each entry is one `write`, so an entry is never
interleaved with another; one process writes it (`synthwatch serve` is one process).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from synthwatch.errors import ConfigError

GENESIS = "0" * 64
"""`prev` of the first entry."""

log = structlog.get_logger("synthwatch.audit")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def verify(path: Path) -> list[str]:
    """Problems found walking the chain of `path`, one line each naming the line number;
    empty when every entry follows from the one before (or the file does not exist)."""
    problems, _head, _count = _walk(path)
    return problems


def _walk(path: Path) -> tuple[list[str], str, int]:
    """(problems, sha256 of the last line, number of lines)."""
    if not path.exists():
        return [], GENESIS, 0
    data = path.read_bytes()
    problems: list[str] = []
    if data and not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        problems.append(f"line {last}: incomplete (no end of line)")
    prev = GENESIS
    lines = data.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"line {number}: not JSON")
            prev = line_hash(line)
            continue
        if not isinstance(entry, dict):
            problems.append(f"line {number}: not a JSON object")
        elif entry.get("prev") != prev:
            problems.append(
                f"line {number}: its prev does not match the sha256 of line {number - 1} "
                "(a line was edited, removed, inserted or reordered)"
                if number > 1
                else "line 1: its prev is not the genesis value (lines were removed before it)"
            )
        elif entry.get("seq") != number:
            problems.append(f"line {number}: seq is {entry.get('seq')!r}, expected {number}")
        prev = line_hash(line)
    return problems, prev, len(lines)


class AuditLog:
    """Appends entries to one file; thread-safe. `close()` it."""

    def __init__(self, path: Path) -> None:
        """Open `path`, creating it. Raises `ConfigError` when the existing log fails
        verification: the server must not add to a log that has been tampered with."""
        path.parent.mkdir(parents=True, exist_ok=True)
        problems, self.head, self._count = _walk(path)
        if problems:
            raise ConfigError(
                f"audit log {path} fails verification: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + "; keep it as evidence and move it aside to start a new log"
            )
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry (`event`, the fields, `time`, `seq`, `prev`), synced to disk
        before returning it."""
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the audit log is closed")
            entry = {
                **fields,
                "event": event,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seq": self._count + 1,
                "prev": self.head,
            }
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            data = line.encode() + b"\n"
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"audit log {self.path}: short write ({written} of {len(data)})")
            os.fsync(self._fd)
            self.head = line_hash(data[:-1])
            self._count += 1
        log.info("audit", audit_event=event, seq=entry["seq"], head=self.head)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first."""
        with self._lock:
            return [json.loads(line) for line in self.path.read_bytes().splitlines()]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
