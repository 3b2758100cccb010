"""Match an item's perceptual hashes against lists of known media.

Most viral fakes a newsroom sees are re-uploads of ones already debunked: a match with
a list of known fakes is precise where a classifier is not, so it decides the verdict
on its own (a `match` signal with `decides="flag"`). A match with a known authentic
original only adds a note: a local edit (a swapped face, changed text) can leave a
picture's hash within the threshold of the original it was made from, so a near
duplicate of an original is not shown authentic, and the detectors' reading stands.
An item that matches both a known fake and a known original is at least `review`, never
flagged on the match: a face swap keeps the whole picture's hash (6 bits from its
source clip on the dev set), so only a person can tell the fake from its source.

Thresholds, per hash type (`MatchingSettings`; facts from facebook/ThreatExchange:
pdq/README, vpdq/README, python-threatexchange's PDQ and vPDQ defaults; what is and is
not published on false matches, and our own measurement, is in docs/MATCHING.md):

- PDQ: at most 31 differing bits of 256, both hashes of quality 50 or more.
- vPDQ (video): frames are compared as PDQ (31 bits, quality 50); a video matches an
  entry when at least 80% of the entry's distinct frames are found in it (the share of
  the item's own frames found in the entry may be anything, 0%, so a known fake inside
  a longer compilation still matches). Frame order and times are not used.

Stills are matched by their PDQ; a video's vPDQ frames and its sampled frames are
matched against PDQ entries too (a known fake still shown in a video is found). The
seven turned and flipped PDQs of every sampled and vPDQ frame (`phash.Variant`) are
matched as well, a video one turn at a time, so a mirrored re-upload is found and the
match says `mirrored`. The
index behind it (`operators/hashindex.py`, multi-index hashing) answers in well under a
millisecond a frame at a million entries (benchmarks/bench_match.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthwatch.operators.hashindex import HammingIndex, pack_hex
from synthwatch.operators.hashlists import MAX_FRAMES, Entry, ListStore
from synthwatch.operators.phash import Variant
from synthwatch.schemas import HashMatch, MediaHash, Signal

MATCH_MODEL = "hashlists"


def default_db() -> Path:
    """`$XDG_DATA_HOME/synthwatch/hashlists.sqlite3` (or under ~/.local/share)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "synthwatch" / "hashlists.sqlite3"


class MatchingSettings(BaseModel):
    """`SYNTHWATCH_MATCHING__*`: where the lists come from and the match thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lists: Literal["local", "kafka", "off"] = "local"
    """`local`: the lists in `db` (`synthwatch hashes import`), read at start; `kafka`:
    the lists on the compacted `kafka.topic_hashlists` topic, followed while running, so
    an update reaches every worker without a restart (`hashes import --cluster`);
    `off`: no matching (hashes are still computed and kept in the verdict)."""
    db: Path = Field(default_factory=default_db)
    """The local lists' SQLite file (`synthwatch hashes` reads and writes it)."""
    vpdq: bool = True
    """Compute a video's vPDQ (a frame a second; a second decoding pass)."""
    vpdq_max_hashes: int = Field(default=900, ge=1)
    """vPDQ frames per video at most (900: 15 minutes at a frame a second); a longer
    video gets this many, spread over its whole length."""
    vpdq_max_s: float = Field(default=60.0, gt=0)
    """Time for a video's vPDQ pass (decoding and hashing). Past it the item is still
    scanned and matched by its sampled frames, and its notes say vPDQ was not made:
    measured (benchmarks/bench_hashing.py), a 1080p video costs about 0.3 s a second of
    video on one core, so ten minutes of it would take three."""
    pdq_distance: int = Field(default=31, ge=0, le=128)
    vpdq_distance: int = Field(default=31, ge=0, le=128)
    min_quality: int = Field(default=50, ge=0, le=100)
    vpdq_entry_percent: float = Field(default=80.0, ge=0, le=100)
    """A video matches a vPDQ entry when this share of the entry's distinct frames is
    found in it."""
    vpdq_item_percent: float = Field(default=0.0, ge=0, le=100)
    """... and this share of the item's own distinct frames is found in the entry."""
    follow_timeout_s: float = Field(default=120.0, gt=0)
    """`lists=kafka`: how long a starting worker waits to have read the lists topic to
    its end before it gives up (a worker never scans with half-loaded lists)."""


@dataclass
class _Slot:
    entry: Entry
    distinct: int
    """Distinct hashes among the entry's frames of usable quality."""


@dataclass
class _Hit:
    distance: int
    time_s: float | None
    transform: str = ""


@dataclass
class _VideoHit:
    entry_frames: dict[str, int] = field(default_factory=dict)
    """The entry's matched distinct hashes -> nearest distance."""
    item_frames: set[str] = field(default_factory=set)
    first_time: float | None = None


class Matcher:
    """The loaded lists and their index. Thread-safe: detect threads match while a list
    follower (`pipeline/listfeed.py`) puts and removes entries."""

    def __init__(self, settings: MatchingSettings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._index = HammingIndex(radius=max(settings.pdq_distance, settings.vpdq_distance))
        self._slots: dict[int, _Slot] = {}
        self._numbers: dict[str, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._slots)

    def load(self, store: ListStore) -> int:
        """Put every entry of `store`; how many."""
        batch: list[Entry] = []
        count = 0
        for entry in store.entries():
            batch.append(entry)
            if len(batch) >= 50_000:
                count += self.put_many(batch)
                batch = []
        return count + self.put_many(batch)

    def put(self, entry: Entry) -> None:
        self.put_many([entry])

    def put_many(self, entries: Sequence[Entry]) -> int:
        """Add or replace entries (by list and id)."""
        if not entries:
            return 0
        codes: list[str] = []
        ids: list[int] = []
        with self._lock:
            self._remove_keys([e.key for e in entries if e.key in self._numbers])
            q = self.settings.min_quality
            for entry in entries:
                number = self._next
                self._next += 1
                frames = entry.frames[:MAX_FRAMES]
                usable = {f.hash for f in frames if f.quality is None or f.quality >= q}
                self._slots[number] = _Slot(entry, len(usable))
                self._numbers[entry.key] = number
                for i, frame in enumerate(frames):
                    codes.append(frame.hash)
                    ids.append(number * (MAX_FRAMES + 1) + i)
            self._index.add(pack_hex(codes), np.asarray(ids, dtype=np.int64))
        return len(entries)

    def remove(self, keys: Iterable[str]) -> int:
        """Remove entries by `<list>/<id>`; how many were loaded."""
        with self._lock:
            return self._remove_keys([k for k in keys if k in self._numbers])

    def _remove_keys(self, keys: list[str]) -> int:
        ids: list[int] = []
        for key in keys:
            number = self._numbers.pop(key)
            slot = self._slots.pop(number)
            base = number * (MAX_FRAMES + 1)
            ids.extend(range(base, base + min(len(slot.entry.frames), MAX_FRAMES)))
        if ids:
            self._index.remove(ids)
        return len(keys)

    def match(
        self, hashes: Sequence[MediaHash], variants: Sequence[Variant] = ()
    ) -> list[HashMatch]:
        """The entries `hashes` (an item's PDQ and vPDQ frames) match: known fakes first,
        then nearest first. `variants`, the frames turned and flipped, find entries of a
        mirrored or rotated copy; a match through them says how. A vPDQ entry is matched
        by one turn at a time (a mirrored video has every frame mirrored)."""
        s = self.settings
        usable = [h for h in hashes if h.quality >= s.min_quality]
        turned = [v for v in variants if v.quality >= s.min_quality]
        if not (usable or turned) or not self._slots:
            return []
        first_time: dict[str, float | None] = {}
        for h in sorted(usable, key=lambda h: (h.time_s is None, h.time_s or 0.0)):
            first_time.setdefault(h.hash, h.time_s)
        video_frames = {h.hash for h in usable if h.algorithm == "vpdq"}
        transform: dict[str, str] = {}
        video_turns: dict[str, str] = {}
        """A vPDQ frame's turned hash -> how it is turned."""
        for v in turned:
            if v.hash not in first_time:
                first_time[v.hash] = v.time_s
                transform[v.hash] = v.transform
            # A sampled frame and a vPDQ frame may be the same picture, with the same
            # turned hashes: the vPDQ frame's still counts for vPDQ entries.
            if v.algorithm == "vpdq" and v.hash not in video_frames:
                video_turns.setdefault(v.hash, v.transform)
        queries = list(first_time)
        radius = max(s.pdq_distance, s.vpdq_distance)
        with self._lock:
            found = self._index.search(pack_hex(queries), radius)
            stills: dict[int, _Hit] = {}
            videos: dict[tuple[int, str], _VideoHit] = {}
            """(entry, how the item's frames are turned: "" for not) -> its frames' hits."""
            for query, results in zip(queries, found, strict=True):
                for index_id, dist in results:
                    number, frame_no = divmod(index_id, MAX_FRAMES + 1)
                    slot = self._slots.get(number)
                    if slot is None:
                        continue
                    frame = slot.entry.frames[frame_no]
                    if frame.quality is not None and frame.quality < s.min_quality:
                        continue
                    if slot.entry.algorithm == "pdq":
                        # The nearest hash wins, an unturned one over any turned one.
                        how = transform.get(query, "")
                        best = stills.get(number)
                        if dist <= s.pdq_distance and (
                            best is None
                            or (how != "", dist) < (best.transform != "", best.distance)
                        ):
                            stills[number] = _Hit(dist, first_time[query], how)
                    elif (query in video_frames or query in video_turns) and (
                        dist <= s.vpdq_distance
                    ):
                        hit = videos.setdefault((number, video_turns.get(query, "")), _VideoHit())
                        nearest = hit.entry_frames.get(frame.hash)
                        hit.entry_frames[frame.hash] = (
                            dist if nearest is None else min(nearest, dist)
                        )
                        hit.item_frames.add(query)
                        t = first_time[query]
                        if t is not None and (hit.first_time is None or t < hit.first_time):
                            hit.first_time = t
            matches = [self._still(self._slots[n], hit) for n, hit in stills.items()]
            # Per vPDQ entry, its plain match if any, else the turn that matched most.
            found_videos: dict[int, HashMatch] = {}
            for (number, how), vhit in sorted(videos.items(), key=lambda kv: kv[0][1] != ""):
                m = self._video(self._slots[number], vhit, len(video_frames), how)
                held = found_videos.get(number)
                if m is not None and (
                    held is None
                    or (
                        held.transform
                        and (m.entry_match_percent or 0) > (held.entry_match_percent or 0)
                    )
                ):
                    found_videos[number] = m
            matches.extend(found_videos.values())
        return sorted(matches, key=lambda m: (m.label != "fake", m.distance, m.list, m.entry))

    def _still(self, slot: _Slot, hit: _Hit) -> HashMatch:
        e = slot.entry
        return HashMatch(
            list=e.list,
            entry=e.id,
            label=e.label,
            algorithm="pdq",
            distance=hit.distance,
            threshold=self.settings.pdq_distance,
            reference=e.reference,
            source=e.source,
            time_s=hit.time_s,
            transform=hit.transform,
        )

    def _video(
        self, slot: _Slot, hit: _VideoHit, item_distinct: int, transform: str
    ) -> HashMatch | None:
        s = self.settings
        entry_pct = 100.0 * len(hit.entry_frames) / max(1, slot.distinct)
        item_pct = 100.0 * len(hit.item_frames) / max(1, item_distinct)
        if entry_pct < s.vpdq_entry_percent or item_pct < s.vpdq_item_percent:
            return None
        e = slot.entry
        return HashMatch(
            list=e.list,
            entry=e.id,
            label=e.label,
            algorithm="vpdq",
            distance=max(hit.entry_frames.values()),
            threshold=s.vpdq_distance,
            reference=e.reference,
            source=e.source,
            time_s=hit.first_time,
            entry_match_percent=round(entry_pct, 1),
            item_match_percent=round(item_pct, 1),
            transform=transform,
        )


def describe(m: HashMatch) -> str:
    """One line a reader can act on: what matched, how closely, where it is told."""
    what = "a known fake" if m.label == "fake" else "a known authentic original"
    how = f"{m.distance} of 256 bits apart (threshold {m.threshold})"
    if m.algorithm == "vpdq":
        how = (
            f"{m.entry_match_percent:g}% of its frames found in this video, "
            f"each at most {m.distance} bits apart (threshold {m.threshold})"
        )
    where = f" at {m.time_s:.1f} s" if m.time_s is not None else ""
    if m.transform:
        where += f", {m.transform}"
    ref = f"; reference: {m.reference}" if m.reference else ""
    source = f", listed by {m.source}" if m.source else ""
    return f"matches {what}{where}: entry {m.entry!r} of list {m.list!r}{source}, {how}{ref}"


AUTHENTIC_NOTE = (
    "a near-duplicate hash of a known original does not show this copy authentic: a "
    "local edit (a swapped face, changed text) can keep the hash within the threshold, "
    "so the detectors' reading stands"
)


CONFLICT_NOTE = (
    "the item matches both a known fake and a known authentic original, so the lists "
    "cannot tell which it is: a fake made from an original (a face swap, a changed "
    "caption) keeps the whole picture's hash, within a few bits of its source; a person "
    "must compare it with both"
)


def match_signals(matches: Sequence[HashMatch]) -> tuple[list[Signal], list[str]]:
    """(signals, notes): a `match` signal that flags on its own for a known fake; a
    reported-only `match_authentic` signal and a note for a known original.

    An item that matches both is `review`, not `flag`: measured on the dev set
    (scripts/pdq_false_matches.py), a face-swapped clip lies 6 bits from the real clip
    it was made from, so a list of fakes also "matches" the fakes' sources, and only a
    person comparing the frames can tell them apart.
    """
    signals: list[Signal] = []
    notes: list[str] = []
    fakes = [m for m in matches if m.label == "fake"]
    originals = [m for m in matches if m.label == "authentic"]
    if fakes:
        signals.append(
            Signal(
                name="match",
                model=f"{MATCH_MODEL}:{fakes[0].list}",
                score=1.0,
                weight=0.0,
                modality="provenance",
                decides="review" if originals else "flag",
                note="; ".join(describe(m) for m in fakes[:3])
                + (f"; and {len(fakes) - 3} more" if len(fakes) > 3 else ""),
            )
        )
        if originals:
            notes.append(CONFLICT_NOTE)
    if originals:
        signals.append(
            Signal(
                name="match_authentic",
                model=f"{MATCH_MODEL}:{originals[0].list}",
                score=0.0,
                weight=0.0,
                modality="provenance",
                note=describe(originals[0]),
            )
        )
        if not fakes:
            notes.append(f"{describe(originals[0])}; {AUTHENTIC_NOTE}")
    return signals, notes
