"""Lists of known media: their entries, the exchange formats they travel in, and the
local store that `synthwatch hashes` and embedded mode keep them in.

A list (`afp-debunked`, `our-originals`) holds entries; each entry is one known item:
a still as one PDQ hash, or a video as its vPDQ (the PDQ of a frame a second), with what
the list says it is (`fake`, or `authentic`: a known original), who listed it (`source`)
and where the finding is told (`reference`: a fact-check URL, a case id).

Formats read and written (`FORMATS`):

- `te`: python-threatexchange's signal file, the format its local-file exchange and
  hasher-matcher-actioner read: one signal per line, `<signal type> <signal>`, e.g.
  `pdq 3f0a...` or `vpdq ["<pdq hex>,<quality>,<seconds>", ...]` (vPDQ as
  python-threatexchange serialises it: a JSON list of `hash,quality,timestamp` strings,
  timestamps to 3 decimals). It carries no metadata: the list, label, source and
  reference come from the command line, and an entry's id is derived from its hash, so
  importing the same file twice changes nothing.
- `te-json`: ThreatExchange descriptors as its Graph API and te-tag-query return them
  (one JSON object per line, a JSON array, or `{"data": [...]}`): `raw_indicator` with
  `type` `HASH_PDQ` (a `HASH_VPDQ` or `vpdq` type is read as a vPDQ signal); `id` is
  the entry id, `description` the reference, `owner.name` the source, `status`
  `MALICIOUS` a fake and `NON_MALICIOUS` an authentic original, `tags` kept. Other
  indicator types (MD5, TMK, URLs) are counted as skipped, never guessed at.
- `jsonl`, `csv`: every field of an entry, for lists kept by hand or moved between
  synthwatch installations without loss.

The store is one SQLite file (`matching.db`): a list of a million entries is a few
hundred MB of JSON and loads in seconds; SQLite gives atomic imports (a failed import
leaves the lists as they were) without a server.
"""

from __future__ import annotations

import builtins
import csv
import hashlib
import io
import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, get_args

import msgspec

from synthwatch.errors import InvalidInput
from synthwatch.schemas import HashAlgorithm, PdqHex

Label = Literal["fake", "authentic"]
Format = Literal["te", "te-json", "jsonl", "csv"]
FORMATS: tuple[str, ...] = get_args(Format)
LABELS: tuple[str, ...] = get_args(Label)

LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A list's name: it appears in verdicts, alerts and file names."""
MAX_ID = 200
MAX_FRAMES = 65_535
"""vPDQ frames per entry: 18 hours at a frame a second."""
_HEX = re.compile(r"^[0-9a-f]{64}$")


class ListFrame(msgspec.Struct, frozen=True, array_like=True):
    """One hash of an entry: a still's PDQ, or one vPDQ frame."""

    hash: PdqHex
    quality: int | None = None
    """0-100; None where the exchange did not say (a `te` PDQ line carries none)."""
    time_s: float | None = None


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    # `list` is the exchange's word for it; `builtins.list` below is the type.
    list: str
    id: str
    label: Label
    algorithm: HashAlgorithm
    frames: builtins.list[ListFrame]
    """A `pdq` entry has exactly one; a `vpdq` entry one per hashed frame."""
    source: str = ""
    reference: str = ""
    added_at: float = 0.0
    tags: builtins.list[str] = []

    @property
    def key(self) -> str:
        """`<list>/<id>`: unique across lists (a list name has no `/`)."""
        return f"{self.list}/{self.id}"


def check_list_name(name: str) -> str:
    if not LIST_NAME.match(name):
        raise InvalidInput(
            f"list name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def checked(entry: Entry) -> Entry:
    """`entry`, or InvalidInput saying what is wrong with it."""
    check_list_name(entry.list)
    if not entry.id or len(entry.id) > MAX_ID or any(c in entry.id for c in "\r\n\t"):
        raise InvalidInput(f"entry id {entry.id!r}: 1-{MAX_ID} characters, no line breaks")
    if entry.label not in LABELS:
        raise InvalidInput(f"entry {entry.id!r}: label must be fake or authentic")
    if not entry.frames:
        raise InvalidInput(f"entry {entry.id!r}: no hash")
    if entry.algorithm == "pdq" and len(entry.frames) != 1:
        raise InvalidInput(f"entry {entry.id!r}: a pdq entry has exactly one hash")
    if len(entry.frames) > MAX_FRAMES:
        raise InvalidInput(f"entry {entry.id!r}: more than {MAX_FRAMES} vPDQ frames")
    for frame in entry.frames:
        if not _HEX.match(frame.hash):
            raise InvalidInput(f"entry {entry.id!r}: {frame.hash!r} is not a PDQ hash")
        if frame.quality is not None and not 0 <= frame.quality <= 100:
            raise InvalidInput(f"entry {entry.id!r}: quality {frame.quality} is not 0-100")
    return entry


def derived_id(algorithm: str, frames: Sequence[ListFrame]) -> str:
    """A stable id for an entry the exchange gave none: its algorithm and a digest of
    its hashes, so the same signal imported twice is one entry."""
    digest = hashlib.sha256("|".join(f.hash for f in frames).encode()).hexdigest()
    return f"{algorithm}-{digest[:20]}"


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Defaults:
    """What an imported row that does not say gets (the `te` format never says)."""

    list: str
    label: Label = "fake"
    source: str = ""
    reference: str = ""


@dataclass
class ReadReport:
    entries: list[Entry]
    skipped: dict[str, int]
    """Rows not imported, by why (an unsupported indicator type, a blank line...)."""


def guess_format(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "te-json"
    if suffix in (".txt", ".te", ".tsv", ""):
        return "te"
    raise InvalidInput(f"{path.name}: cannot tell the format from {suffix!r}; pass --format")


def parse_pdq(value: str, where: str) -> str:
    h = value.strip().lower()
    if not _HEX.match(h):
        raise InvalidInput(f"{where}: {value.strip()[:80]!r} is not a PDQ hash (64 hex digits)")
    return h


def parse_vpdq(signal: str, where: str) -> list[ListFrame]:
    """python-threatexchange's vPDQ signal: a JSON list of `hash,quality,timestamp`."""
    try:
        items = json.loads(signal)
    except ValueError:
        raise InvalidInput(f"{where}: vpdq signal is not a JSON list") from None
    if not isinstance(items, list) or not items:
        raise InvalidInput(f"{where}: vpdq signal is not a non-empty JSON list")
    frames = []
    for item in items:
        parts = str(item).split(",")
        if len(parts) != 3:
            raise InvalidInput(f"{where}: vpdq feature {str(item)[:80]!r} is not hash,quality,time")
        try:
            quality, time_s = int(parts[1]), float(parts[2])
        except ValueError:
            raise InvalidInput(f"{where}: vpdq feature {str(item)[:80]!r} does not parse") from None
        frames.append(ListFrame(parse_pdq(parts[0], where), quality, time_s))
    return frames


def vpdq_signal(frames: Sequence[ListFrame]) -> str:
    """The inverse of `parse_vpdq`."""
    return json.dumps(
        [
            f"{f.hash},{100 if f.quality is None else f.quality},{f.time_s or 0.0:.3f}"
            for f in frames
        ]
    )


def read_entries(stream: IO[str], fmt: Format, defaults: Defaults) -> ReadReport:
    """Entries from `stream`; InvalidInput names the line of the first malformed row,
    so an import is all or nothing."""
    check_list_name(defaults.list)
    readers = {"te": _read_te, "te-json": _read_te_json, "jsonl": _read_jsonl, "csv": _read_csv}
    report = ReadReport(entries=[], skipped={})
    for entry in readers[fmt](stream, defaults, report):
        report.entries.append(checked(entry))
    return report


def _skip(report: ReadReport, why: str) -> None:
    report.skipped[why] = report.skipped.get(why, 0) + 1


def _entry(
    defaults: Defaults, algorithm: HashAlgorithm, frames: list[ListFrame], **fields: Any
) -> Entry:
    given = {k: v for k, v in fields.items() if v not in (None, "")}
    return Entry(
        list=defaults.list,
        id=str(given.pop("id", "") or derived_id(algorithm, frames)),
        label=given.pop("label", defaults.label),
        algorithm=algorithm,
        frames=frames,
        source=str(given.pop("source", defaults.source)),
        reference=str(given.pop("reference", defaults.reference)),
        added_at=float(given.pop("added_at", 0.0)) or time.time(),
        tags=list(given.pop("tags", [])),
    )


def _read_te(stream: IO[str], defaults: Defaults, report: ReadReport) -> Iterator[Entry]:
    for number, raw in enumerate(stream, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, signal = line.partition(" ")
        where = f"line {number}"
        kind = kind.lower()
        if kind == "pdq":
            yield _entry(defaults, "pdq", [ListFrame(parse_pdq(signal, where))])
        elif kind == "vpdq":
            yield _entry(defaults, "vpdq", parse_vpdq(signal.strip(), where))
        else:
            _skip(report, f"signal type {kind!r}")


_TE_TYPES: dict[str, HashAlgorithm] = {
    "hash_pdq": "pdq",
    "pdq": "pdq",
    "hash_vpdq": "vpdq",
    "vpdq": "vpdq",
}
_TE_STATUS: dict[str, Label] = {"malicious": "fake", "non_malicious": "authentic"}


def _read_te_json(stream: IO[str], defaults: Defaults, report: ReadReport) -> Iterator[Entry]:
    text = stream.read()
    try:
        doc: Any = json.loads(text)
        rows = doc.get("data", [doc]) if isinstance(doc, dict) else doc
    except ValueError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise InvalidInput(
                f"not ThreatExchange JSON (a document or one per line): {exc}"
            ) from None
    if not isinstance(rows, list):
        raise InvalidInput("not ThreatExchange JSON: expected descriptors")
    for number, row in enumerate(rows, 1):
        where = f"descriptor {number}"
        if not isinstance(row, dict):
            raise InvalidInput(f"{where}: not a JSON object")
        indicator = row.get("raw_indicator")
        if indicator is None and isinstance(row.get("indicator"), dict):
            indicator = row["indicator"].get("indicator")
        kind = str(row.get("type") or row.get("indicator_type") or "").lower()
        algorithm = _TE_TYPES.get(kind)
        if algorithm is None or not isinstance(indicator, str):
            _skip(report, f"indicator type {kind.upper() or 'missing'}")
            continue
        frames = (
            [ListFrame(parse_pdq(indicator, where))]
            if algorithm == "pdq"
            else parse_vpdq(indicator, where)
        )
        owner = row["owner"] if isinstance(row.get("owner"), dict) else {}
        status = str(row.get("status") or "").lower()
        tags = row.get("tags") or []
        yield _entry(
            defaults,
            algorithm,
            frames,
            id=str(row.get("id") or ""),
            label=_TE_STATUS.get(status),
            source=str(owner.get("name") or ""),
            reference=str(row.get("description") or ""),
            added_at=_te_time(row.get("added_on")),
            tags=[str(t) for t in tags] if isinstance(tags, list) else [],
        )


def _te_time(value: object) -> float | None:
    """ThreatExchange's `2020-06-03T01:38:01+0000`, as Unix time."""
    if not isinstance(value, str):
        return None
    from datetime import datetime

    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _read_jsonl(stream: IO[str], defaults: Defaults, report: ReadReport) -> Iterator[Entry]:
    decoder = msgspec.json.Decoder(Entry)
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            entry = decoder.decode(line)
        except msgspec.MsgspecError as exc:
            raise InvalidInput(f"line {number}: {exc}") from None
        # The list imported into is the one the user named, whatever the file says.
        yield msgspec.structs.replace(entry, list=defaults.list)


CSV_FIELDS = (
    "id",
    "label",
    "algorithm",
    "hash",
    "quality",
    "source",
    "reference",
    "added_at",
    "tags",
)


def _read_csv(stream: IO[str], defaults: Defaults, report: ReadReport) -> Iterator[Entry]:
    reader = csv.DictReader(stream)
    if reader.fieldnames is None or "hash" not in reader.fieldnames:
        raise InvalidInput(
            f"CSV needs a header with at least a hash column ({', '.join(CSV_FIELDS)})"
        )
    for number, row in enumerate(reader, 2):
        where = f"line {number}"
        algorithm = (row.get("algorithm") or "pdq").strip().lower()
        value = row.get("hash") or ""
        if algorithm == "pdq":
            quality = (row.get("quality") or "").strip()
            frames = [
                ListFrame(parse_pdq(value, where), int(quality) if quality.isdigit() else None)
            ]
        elif algorithm == "vpdq":
            frames = parse_vpdq(value, where)
        else:
            raise InvalidInput(f"{where}: algorithm must be pdq or vpdq, not {algorithm!r}")
        label = (row.get("label") or "").strip().lower() or None
        if label is not None and label not in LABELS:
            raise InvalidInput(f"{where}: label must be fake or authentic, not {label!r}")
        added = (row.get("added_at") or "").strip()
        yield _entry(
            defaults,
            "pdq" if algorithm == "pdq" else "vpdq",
            frames,
            id=(row.get("id") or "").strip(),
            label=label,
            source=(row.get("source") or "").strip(),
            reference=(row.get("reference") or "").strip(),
            added_at=float(added) if added else None,
            tags=[t for t in (row.get("tags") or "").split(";") if t],
        )


def write_entries(entries: Iterable[Entry], fmt: Format, out: IO[str]) -> int:
    """Write `entries` in `fmt`; the count written. `te` keeps only the signals (the
    format has nowhere for the rest); `te-json` writes one descriptor per line."""
    count = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_FIELDS)
    for e in entries:
        signal = e.frames[0].hash if e.algorithm == "pdq" else vpdq_signal(e.frames)
        if fmt == "te":
            out.write(f"{e.algorithm} {signal}\n")
        elif fmt == "te-json":
            descriptor = {
                "id": e.id,
                "raw_indicator": signal,
                "type": "HASH_PDQ" if e.algorithm == "pdq" else "HASH_VPDQ",
                "status": "MALICIOUS" if e.label == "fake" else "NON_MALICIOUS",
                "description": e.reference,
                "owner": {"name": e.source},
                "tags": e.tags,
                "added_on": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(e.added_at)),
            }
            out.write(json.dumps(descriptor) + "\n")
        elif fmt == "jsonl":
            out.write(msgspec.json.encode(e).decode() + "\n")
        else:
            assert writer is not None
            quality = e.frames[0].quality if e.algorithm == "pdq" else None
            writer.writerow(
                (
                    e.id,
                    e.label,
                    e.algorithm,
                    signal,
                    "" if quality is None else quality,
                    e.source,
                    e.reference,
                    f"{e.added_at:.3f}",
                    ";".join(e.tags),
                )
            )
        count += 1
    return count


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class ListSummary:
    name: str
    entries: int
    fakes: int
    authentic: int
    pdq: int
    vpdq: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    list TEXT NOT NULL,
    id TEXT NOT NULL,
    label TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (list, id)
)
"""


class ListStore:
    """The lists on this machine, in one SQLite file. Each method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise InvalidInput(f"cannot open the hash lists at {path}: {exc}") from None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Entry)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ListStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, entries: Sequence[Entry]) -> tuple[int, int]:
        """Add or replace entries, all or none; (added, replaced)."""
        added = replaced = 0
        with self._transaction():
            for e in entries:
                row = self._db.execute(
                    "SELECT 1 FROM entries WHERE list = ? AND id = ?", (e.list, e.id)
                ).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                    (e.list, e.id, e.label, e.algorithm, self._encoder.encode(e)),
                )
                if row is None:
                    added += 1
                else:
                    replaced += 1
        return added, replaced

    def remove(self, name: str, ids: Sequence[str] | None = None) -> list[Entry]:
        """Remove the named entries (all of the list when `ids` is None); the removed."""
        with self._transaction():
            gone = list(self.entries(name, ids))
            if ids is None:
                self._db.execute("DELETE FROM entries WHERE list = ?", (name,))
            else:
                self._db.executemany(
                    "DELETE FROM entries WHERE list = ? AND id = ?", [(name, i) for i in ids]
                )
        return gone

    def entries(self, name: str | None = None, ids: Sequence[str] | None = None) -> Iterator[Entry]:
        if ids is not None:
            assert name is not None
            for i in ids:
                row = self._db.execute(
                    "SELECT record FROM entries WHERE list = ? AND id = ?", (name, i)
                ).fetchone()
                if row is not None:
                    yield self._decoder.decode(row[0])
            return
        query = "SELECT record FROM entries"
        args: tuple[str, ...] = ()
        if name is not None:
            query, args = query + " WHERE list = ?", (name,)
        for (record,) in self._db.execute(query + " ORDER BY list, id", args):
            yield self._decoder.decode(record)

    def lists(self) -> list[ListSummary]:
        rows = self._db.execute(
            "SELECT list, count(*), sum(label = 'fake'), sum(label = 'authentic'), "
            "sum(algorithm = 'pdq'), sum(algorithm = 'vpdq') "
            "FROM entries GROUP BY list ORDER BY list"
        ).fetchall()
        return [ListSummary(*row) for row in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def dumps(entries: Iterable[Entry], fmt: Format) -> str:
    """`write_entries` into a string (tests, the API)."""
    out = io.StringIO()
    write_entries(entries, fmt, out)
    return out.getvalue()
