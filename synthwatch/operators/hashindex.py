"""Radius search over 256-bit PDQ hashes: every known hash within 31 bits of a query, at millions.

A list of known fakes may hold millions of PDQ hashes, and a match is any of them within
`MATCH_DISTANCE` bits of a scanned frame's hash. Comparing each query with every entry
(`brute_force`) costs about 4 ms per query at 1M entries on one core; this index answers
the same question, exactly and with the same answers, in a small fraction of that.

The method is multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming
Space with Multi-Index Hashing", CVPR 2012), reimplemented here from the paper's idea:

- the 256 bits are cut into `m` disjoint substrings (16 of 16 bits by default);
- pigeonhole: if two codes differ in at most r bits, some substring differs in at most
  floor(r/m). The paper's sharper form, used here: with r = s*m + a, one of the first
  a+1 substrings is within s, or one of the others within s-1 (else the distance would
  be at least (a+1)(s+1) + (m-a-1)s = r+1);
- so each substring of the query, and every value within its sub-radius (17 probes for
  16 bits at sub-radius 1), is looked up in that substring's table, and whatever is found
  there is a candidate, verified by its full distance (XOR and popcount, vectorised).

A table is a counting sort of the entries by one substring: `order` lists rows bucket by
bucket, `offsets[v]:offsets[v+1]` is bucket v. That is two numpy arrays per substring
(all substrings concatenated: see `_Tables`), built in O(N) with numpy's radix argsort,
and a lookup is two array reads, no hashing. Candidates are verified before they are
deduplicated: a random entry is rarely found through two substrings, so sorting every
candidate to drop repeats would cost more than verifying the few repeats.

Why 16 substrings of 16 bits (benchmarks/bench_match.py, results/match.json; radius 31,
queries/s over the scan's): at 1M entries m=16 gives 48x, m=14 52x (within the machine's
drift) but builds 4x slower (1.5 s against 0.36 s: no radix sort for 18-19-bit keys) and
at 100k gives 2x to m=16's 16x, its wide substrings binary-searched there; m=12
(sub-radius 2) 8.7x, m=18 21x, m=32 (8-bit buckets of ~4k rows) 2.3x, m=8 (sub-radius
3: 44k probes a query) none. 16 bits keep the probes at 272 per query, the build on
numpy's radix sort, and a substring's offsets at 65,537 whatever the list's size.

Entries added after the tables were built sit in a delta that is searched by brute force,
and are merged (the tables rebuilt) once the delta outgrows a fraction of the main part:
adding one entry costs amortised microseconds. Removal is a tombstone; the tables drop
tombstoned rows on the next rebuild.

Threads: every search works on an immutable snapshot of the index, taken once; writers
(`add`, `remove`, and the rebuilds they trigger) hold a lock, build a new snapshot and
publish it with one assignment. Searches therefore never wait for a writer and never see
half a change.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import comb, log2
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from synthwatch.operators.phash import MATCH_DISTANCE

BITS = 256
WORDS = 4
"""A PDQ hash as numpy holds it: four uint64 words, the first hex digit's high bit first."""
SUBSTRINGS = 16
"""Substrings per code (m). See the module docstring for why 16."""
DELTA_MIN = 4096
DELTA_FRACTION = 1 / 64
"""The delta is merged into the tables once it holds more than max(DELTA_MIN,
DELTA_FRACTION of the main part) rows. The trade: at 1M a rebuild costs ~0.4 s, so merging
every 15.6k adds costs ~25 us per add (in the writer), while scanning up to 15.6k delta
rows costs a search up to ~60 us per query, about half what the tables cost."""
DEAD_FRACTION = 1 / 4
"""Tombstoned rows beyond this share of the main part trigger a rebuild that drops them."""
CANDIDATE_COST = 6.0
PROBE_COST = 6.0
"""Cost of verifying one candidate and of one bucket lookup, in units of one entry of a
brute-force scan (measured: ~22 ns against ~3.8 ns). A search whose expected cost exceeds
the scan's (large radii: 63 bits is ~170k candidates per query at 1M) scans instead."""
DIRECT_MIN = 1 << 16
"""Substrings up to this many values (or twice the entries) get a bucket offset table."""
SCAN_BLOCK = 1 << 15
"""Query x entry pairs per brute-force pass: a block of queries per pass halves the time
per query at 1k entries; from ~16k entries one query per pass is as fast or faster."""
CHUNK_CANDIDATES = 1 << 18
"""Candidates verified per batch of queries: ~20 MB of temporaries. Measured at 1M entries,
2**21 was 1.5-2x slower (fresh pages for every temporary), 2**16 to 2**19 alike."""

Codes = npt.NDArray[np.uint64]
Ids = npt.NDArray[np.int64]
Matches = list[list[tuple[int, int]]]

_A = TypeVar("_A", bound=npt.NDArray[Any])
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def pack_hex(hashes: Sequence[str]) -> Codes:
    """PDQ hashes as written (64 hex digits each) to an (N, 4) uint64 array.

    The hex digits are read as one 256-bit big-endian number, which is how PDQ's
    reference code writes its bits (first bit most significant): word 0 holds bits 0-63,
    and a word's high bit is the lower-numbered bit. Distances do not depend on the bit
    order, but substrings do, and hashes packed elsewhere must agree with these.

    Raises ValueError naming the first hash that is not exactly 64 hex digits.
    """
    for h in hashes:
        if not isinstance(h, str) or _HEX64.fullmatch(h) is None:
            raise ValueError(f"not a PDQ hash (64 hex digits): {h!r}")
    raw = bytes.fromhex("".join(hashes))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hashes), WORDS)


def unpack_hex(codes: Codes) -> list[str]:
    """The inverse of `pack_hex`: 64 lowercase hex digits per row."""
    raw = np.ascontiguousarray(_check_codes(codes), dtype=">u8").tobytes()
    return [raw[i : i + 32].hex() for i in range(0, len(raw), 32)]


def brute_force(codes: Codes, index_codes: Codes, index_ids: Ids, radius: int) -> Matches:
    """Every (id, distance) within `radius` of each query, by comparing with every entry.

    The baseline the index must agree with exactly (tests and benchmarks/bench_match.py),
    and what the index itself falls back to for radii where the pigeonhole bound prunes
    too little. Results per query are sorted by distance, then id.
    """
    codes = _check_codes(codes)
    index_codes = _check_codes(index_codes)
    index_ids = _check_ids(index_ids, len(index_codes))
    radius = _check_radius(radius)
    q_all, rows_all, d_all = _scan(codes, index_codes, radius)
    return _group(len(codes), q_all, index_ids[rows_all], d_all)


@dataclass(frozen=True)
class _Tables:
    """The main part's rows sorted once per substring, all substrings in one array.

    Block i of `order` (positions i*n to (i+1)*n) lists the rows by substring i's value.
    Where a substring's 2**width values are affordable as bucket offsets, bucket v of
    substring i is order[offsets[bases[i] + v] : offsets[bases[i] + v + 1]]; a wider
    substring (bases[i] == -1) keeps its sorted `values` to binary-search instead. One
    array for all substrings lets a search gather, verify and filter the candidates of
    every substring in one numpy call each, not one per substring: numpy's per-call cost
    would otherwise dominate a search of a few queries.
    """

    order: npt.NDArray[np.int32]
    offsets: npt.NDArray[np.int32]
    bases: tuple[int, ...]
    values: tuple[npt.NDArray[np.uint32] | None, ...]

    @property
    def nbytes(self) -> int:
        return (
            self.order.nbytes
            + self.offsets.nbytes
            + sum(v.nbytes for v in self.values if v is not None)
        )


@dataclass(frozen=True)
class _Snapshot:
    """One consistent state of the index. Never mutated after publication: writers build a
    new one (arrays shared where unchanged), so a search needs no lock."""

    codes: Codes
    ids: Ids
    """The main part's rows, sorted by id (so `remove` finds rows by binary search)."""
    alive: npt.NDArray[np.bool_]
    tables: _Tables | None
    """None while the main part is empty."""
    delta_codes: Codes
    delta_ids: Ids
    delta_alive: npt.NDArray[np.bool_]
    """Rows added since the tables were built; views of the writer's growable buffers,
    cut at the length they had when published (later appends land beyond the view)."""
    live: int
    dead_main: int


class HammingIndex:
    """Exact radius search over PDQ codes by multi-index hashing (see the module docstring).

    Ids are the caller's: adding an id twice holds both codes (and both match); removing an
    id removes every entry that carries it. Removing an id the index does not hold is not an
    error, since a list-update follower may replay a removal.

    `radius` is the default for `search`; `substrings` (m, 8 to 64) is there to measure
    other splits (bench_match.py) and should otherwise stay at 16.
    """

    def __init__(self, radius: int = MATCH_DISTANCE, *, substrings: int = SUBSTRINGS) -> None:
        if not 8 <= substrings <= 64:
            raise ValueError(f"substrings must be 8 to 64 (at most 32 bits each): {substrings}")
        self.radius = _check_radius(radius)
        self.substrings = substrings
        base, extra = divmod(BITS, substrings)
        widths = [base + 1] * extra + [base] * (substrings - extra)
        self._layout = tuple(zip(itertools.accumulate([0, *widths[:-1]]), widths, strict=True))
        self._lock = threading.Lock()
        empty_codes = np.zeros((0, WORDS), np.uint64)
        empty_ids = np.zeros(0, np.int64)
        empty_alive = np.zeros(0, np.bool_)
        self._buf_codes, self._buf_ids, self._buf_alive = empty_codes, empty_ids, empty_alive
        self._snap = _Snapshot(
            codes=empty_codes,
            ids=empty_ids,
            alive=empty_alive,
            tables=None,
            delta_codes=empty_codes,
            delta_ids=empty_ids,
            delta_alive=empty_alive,
            live=0,
            dead_main=0,
        )

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays (codes, ids, tables, delta buffers)."""
        snap = self._snap
        arrays = (snap.codes, snap.ids, snap.alive, self._buf_codes, self._buf_ids)
        return sum(a.nbytes for a in arrays) + (snap.tables.nbytes if snap.tables else 0)

    def __len__(self) -> int:
        """Live entries: added and not removed."""
        return self._snap.live

    # ------------------------------------------------------------------ writers

    def add(self, codes: Codes, ids: Ids) -> None:
        """Add entries. They go to the delta (copied, so the caller may reuse its arrays);
        a delta grown past its bound is merged into the tables before this returns, so the
        writer, not a search, pays for rebuilds."""
        codes = _check_codes(codes)
        ids = _check_ids(ids, len(codes))
        if not len(codes):
            return
        with self._lock:
            snap = self._snap
            n, k = len(snap.delta_ids), len(codes)
            if n + k > max(DELTA_MIN, int(len(snap.ids) * DELTA_FRACTION)):
                self._snap = self._rebuild(snap, codes, ids)
                return
            if n + k > len(self._buf_ids):
                # Grow by doubling into fresh buffers: published views keep the old ones.
                cap = max(2 * (n + k), 1024)
                self._buf_codes = _grown(self._buf_codes[:n], cap)
                self._buf_ids = _grown(self._buf_ids[:n], cap)
                self._buf_alive = _grown(self._buf_alive[:n], cap)
            self._buf_codes[n : n + k] = codes
            self._buf_ids[n : n + k] = ids
            self._buf_alive[n : n + k] = True
            self._snap = dataclasses.replace(
                snap,
                delta_codes=self._buf_codes[: n + k],
                delta_ids=self._buf_ids[: n + k],
                delta_alive=self._buf_alive[: n + k],
                live=snap.live + k,
            )

    def remove(self, ids: Iterable[int]) -> None:
        """Tombstone every entry carrying one of `ids`; later searches never return them."""
        given = ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64)
        gone = np.unique(np.asarray(given, dtype=np.int64))
        if not len(gone):
            return
        with self._lock:
            snap = self._snap
            # The main part is sorted by id: each removed id is one range of rows.
            left = np.searchsorted(snap.ids, gone, side="left")
            right = np.searchsorted(snap.ids, gone, side="right")
            rows = _expand_ranges(left, right - left)
            alive, dead_main = snap.alive, snap.dead_main
            killed = int(np.count_nonzero(alive[rows]))
            if killed:
                alive = alive.copy()  # copy on write: published snapshots keep theirs
                alive[rows] = False
                dead_main += killed
            n = len(snap.delta_ids)
            delta_alive = snap.delta_alive
            hit = np.isin(snap.delta_ids, gone) & delta_alive
            killed_delta = int(np.count_nonzero(hit))
            if killed_delta:
                self._buf_alive = self._buf_alive.copy()
                self._buf_alive[:n][hit] = False
                delta_alive = self._buf_alive[:n]
            snap = dataclasses.replace(
                snap,
                alive=alive,
                delta_alive=delta_alive,
                live=snap.live - killed - killed_delta,
                dead_main=dead_main,
            )
            if dead_main > len(snap.ids) * DEAD_FRACTION:
                snap = self._rebuild(snap)
            self._snap = snap

    def _rebuild(
        self, snap: _Snapshot, codes: Codes | None = None, ids: Ids | None = None
    ) -> _Snapshot:
        """Merge the delta (and `codes`, `ids` being added) into the main part, drop
        tombstones, rebuild every table."""
        codes = np.concatenate(
            [snap.codes[snap.alive], snap.delta_codes[snap.delta_alive]]
            + ([] if codes is None else [codes])
        )
        ids = np.concatenate(
            [snap.ids[snap.alive], snap.delta_ids[snap.delta_alive]]
            + ([] if ids is None else [ids])
        )
        by_id = np.argsort(ids, kind="stable")
        codes, ids = codes[by_id], ids[by_id]
        # The old buffers may still back published snapshots: start fresh ones.
        empty_codes = np.zeros((0, WORDS), np.uint64)
        empty_ids = np.zeros(0, np.int64)
        empty_alive = np.zeros(0, np.bool_)
        self._buf_codes, self._buf_ids, self._buf_alive = empty_codes, empty_ids, empty_alive
        return _Snapshot(
            codes=codes,
            ids=ids,
            alive=np.ones(len(ids), np.bool_),
            tables=self._build_tables(codes),
            delta_codes=empty_codes,
            delta_ids=empty_ids,
            delta_alive=empty_alive,
            live=len(ids),
            dead_main=0,
        )

    def _build_tables(self, codes: Codes) -> _Tables | None:
        n = len(codes)
        if not n:
            return None
        if n * len(self._layout) >= 2**31:
            raise ValueError(f"too many entries for one index: {n}")  # positions are int32
        orders, offsets, bases = [], [], []
        values: list[npt.NDArray[np.uint32] | None] = []
        start = 0
        for i, (lo, width) in enumerate(self._layout):
            # A 16-bit key gets numpy's radix sort (O(n)); wider keys a merge sort.
            key = _substring(codes, lo, width).astype(np.uint16 if width <= 16 else np.uint32)
            order = np.argsort(key, kind="stable")
            orders.append(order.astype(np.int32))
            if 1 << width <= max(DIRECT_MIN, 2 * n):
                bounds = np.empty((1 << width) + 1, np.int64)
                bounds[0] = 0
                np.cumsum(np.bincount(key, minlength=1 << width), out=bounds[1:])
                offsets.append(bounds + i * n)
                bases.append(start)
                start += len(bounds)
                values.append(None)
            else:
                bases.append(-1)
                values.append(key[order].astype(np.uint32))
        return _Tables(
            order=np.concatenate(orders),
            offsets=np.concatenate(offsets).astype(np.int32) if offsets else np.zeros(0, np.int32),
            bases=tuple(bases),
            values=tuple(values),
        )

    # ------------------------------------------------------------------ search

    def search(self, codes: Codes, radius: int | None = None) -> Matches:
        """Per query, (id, distance) of every live entry within `radius` (default: the
        index's), sorted by distance, then id: the same answers as `brute_force`.

        Any radius from 0 to 256 is answered exactly. A wider one than the index's widens
        the sub-radii (47 bits: 137 probes per substring instead of 17); where the expected
        cost passes a scan's (at 1M entries, from about 60 bits), the main part is scanned.
        """
        codes = _check_codes(codes)
        radius = self.radius if radius is None else _check_radius(radius)
        if not len(codes):
            return []
        snap = self._snap  # the one state this search sees, whatever writers do meanwhile
        q_parts, id_parts, d_parts = [], [], []
        if len(snap.ids):
            plan = self._plan(radius)
            if plan is None or self._mih_cost(snap, plan) > len(snap.ids):
                q, rows, d = _scan(codes, snap.codes, radius)
            else:
                q, rows, d = self._probe(snap, codes, radius, plan)
            keep = snap.alive[rows]
            q_parts.append(q[keep])
            id_parts.append(snap.ids[rows[keep]])
            d_parts.append(d[keep])
        if len(snap.delta_ids):
            q, rows, d = _scan(codes, snap.delta_codes, radius)
            keep = snap.delta_alive[rows]
            q_parts.append(q[keep])
            id_parts.append(snap.delta_ids[rows[keep]])
            d_parts.append(d[keep])
        if not q_parts:
            return [[] for _ in range(len(codes))]
        return _group(
            len(codes), np.concatenate(q_parts), np.concatenate(id_parts), np.concatenate(d_parts)
        )

    def _plan(self, radius: int) -> list[tuple[int, int]] | None:
        """Sub-radius per substring index for `radius`, by the sharper pigeonhole bound;
        substrings with sub-radius -1 need no lookup. None where a lookup would enumerate
        more than a million flip masks (huge radii: scanning is cheaper anyway)."""
        m = self.substrings
        s, a = divmod(radius, m)
        plan: list[tuple[int, int]] = []
        for i, (_lo, width) in enumerate(self._layout):
            sub = s if i <= a else s - 1
            if sub < 0:
                continue
            if sum(comb(width, k) for k in range(min(sub, width) + 1)) > 1_000_000:
                return None
            plan.append((i, min(sub, width)))
        return plan

    def _mih_cost(self, snap: _Snapshot, plan: list[tuple[int, int]]) -> float:
        """Expected cost per query of the lookups in `plan`, in brute-force entry units, for
        uniformly random codes (each probed bucket holds n / 2**width rows on average)."""
        assert snap.tables is not None
        n = len(snap.ids)
        cost = 0.0
        for i, sub in plan:
            width = self._layout[i][1]
            probes = sum(comb(width, k) for k in range(sub + 1))
            # A binary search is two walks of log2(n) steps, each about a cache miss.
            probe = PROBE_COST if snap.tables.bases[i] >= 0 else 2 * max(1.0, log2(n))
            cost += probes * (probe + CANDIDATE_COST * n / 2**width)
        return cost

    def _probe(
        self,
        snap: _Snapshot,
        codes: Codes,
        radius: int,
        plan: list[tuple[int, int]],
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.uint16]]:
        """(query, main row, distance) of every main-part row within `radius`, once each."""
        per_query = max(1.0, self._mih_cost(snap, plan) / CANDIDATE_COST)
        step = max(1, int(CHUNK_CANDIDATES / per_query))
        tables = snap.tables
        assert tables is not None
        n_rows = len(snap.ids)
        q_parts, row_parts, d_parts = [], [], []
        for start in range(0, len(codes), step):
            chunk = codes[start : start + step]
            keys, key_q, probe_q = [], [], []
            firsts: list[npt.NDArray[np.integer[Any]]] = []
            lengths: list[npt.NDArray[np.integer[Any]]] = []
            for i, sub in plan:
                lo, width = self._layout[i]
                masks = _flip_masks(width, sub)
                probes = (_substring(chunk, lo, width)[:, None] ^ masks).ravel()
                owner = np.arange(len(chunk)).repeat(len(masks))
                if tables.bases[i] >= 0:
                    keys.append(probes + tables.bases[i])
                    key_q.append(owner)
                else:
                    sorted_values = tables.values[i]
                    assert sorted_values is not None
                    found = np.searchsorted(sorted_values, probes.astype(np.uint32), "left")
                    end = np.searchsorted(sorted_values, probes.astype(np.uint32), "right")
                    firsts.append(found + i * n_rows)
                    lengths.append(end - found)
                    probe_q.append(owner)
            if keys:
                key = np.concatenate(keys)
                bucket = tables.offsets[key]
                firsts.append(bucket)
                lengths.append(tables.offsets[key + 1] - bucket)
                probe_q.append(np.concatenate(key_q))
            length = np.concatenate(lengths)
            rows = tables.order[_expand_ranges(np.concatenate(firsts), length)]
            q = np.repeat(np.concatenate(probe_q), length)
            d = _row_distances(snap.codes, rows, chunk, q)
            hit = np.flatnonzero(d <= radius)
            # A neighbour is found once per substring within its sub-radius: keep one.
            q_c, rows_c, d_c = q[hit], rows[hit].astype(np.intp), d[hit]
            _, first = np.unique(q_c.astype(np.int64) * n_rows + rows_c, return_index=True)
            q_parts.append(q_c[first] + start)
            row_parts.append(rows_c[first])
            d_parts.append(d_c[first])
        return (
            np.concatenate(q_parts).astype(np.intp),
            np.concatenate(row_parts),
            np.concatenate(d_parts),
        )


# ---------------------------------------------------------------------- helpers


def _check_codes(codes: Codes) -> Codes:
    codes = np.asarray(codes)
    if codes.dtype != np.uint64 or codes.ndim != 2 or codes.shape[1] != WORDS:
        raise ValueError(f"codes must be uint64 of shape (N, 4), got {codes.dtype} {codes.shape}")
    return codes


def _check_ids(ids: Ids, n: int) -> Ids:
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n or (len(ids) and ids.dtype.kind not in "iu"):
        raise ValueError(f"ids must be {n} integers, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _check_radius(radius: int) -> int:
    if not 0 <= radius <= BITS:
        raise ValueError(f"radius must be 0 to {BITS}: {radius}")
    return int(radius)


def _grown(a: _A, cap: int) -> _A:
    """`a` copied into a zeroed array of `cap` rows."""
    out = np.zeros_like(a, shape=(cap, *a.shape[1:]))
    out[: len(a)] = a
    return cast(_A, out)


def _substring(codes: Codes, lo: int, width: int) -> Codes:
    """Bits lo..lo+width-1 (bit 0: word 0's high bit) of each code, as an integer."""
    hi = lo + width
    w0, w1 = lo // 64, (hi - 1) // 64
    if w0 == w1:
        shifted = codes[:, w0] >> np.uint64(64 * (w0 + 1) - hi)
        return shifted & np.uint64((1 << width) - 1)
    n_low = hi - 64 * w1  # bits taken from the next word
    high = codes[:, w0] & np.uint64((1 << (64 * w1 - lo)) - 1)
    return (high << np.uint64(n_low)) | (codes[:, w1] >> np.uint64(64 - n_low))


@lru_cache(maxsize=64)
def _flip_masks(width: int, radius: int) -> Codes:
    """Every width-bit mask with at most `radius` bits set: XORed with a substring, the
    values within `radius` of it (the probes)."""
    masks = [
        sum(1 << b for b in bits)
        for k in range(radius + 1)
        for bits in itertools.combinations(range(width), k)
    ]
    out = np.array(masks, dtype=np.uint64)
    out.flags.writeable = False
    return out


def _expand_ranges(
    starts: npt.NDArray[np.integer[Any]], lengths: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.intp]:
    """Concatenate range(starts[i], starts[i] + lengths[i]) for every i, vectorised."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.intp)
    ends = np.cumsum(lengths)
    shift: npt.NDArray[np.intp] = np.repeat(starts - (ends - lengths), lengths).astype(np.intp)
    shift += np.arange(total, dtype=np.intp)
    return shift


def _row_distances(
    codes: Codes,
    rows: npt.NDArray[np.integer[Any]],
    queries: Codes,
    q: npt.NDArray[np.intp],
) -> npt.NDArray[np.uint16]:
    """Hamming distance between codes[rows[k]] and queries[q[k]] for every k."""
    x = np.take(codes, rows, axis=0)
    x ^= np.take(queries, q, axis=0)
    bits = np.bitwise_count(x)
    d = np.add(bits[:, 0], bits[:, 1], dtype=np.uint16)
    d += bits[:, 2]
    d += bits[:, 3]
    return d


def _scan(
    codes: Codes, index_codes: Codes, radius: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.uint16]]:
    """(query, row, distance) of every index row within `radius` of each query, by one pass
    over the index per query. The words are passed as contiguous columns (a row-major pass
    measured 5x slower); a small index takes a block of queries per pass, so that numpy's
    per-call cost does not dominate, a large one a query at a time (broadcasting a block
    over a million rows measured 1.7x slower than plain 1-D passes)."""
    columns = np.ascontiguousarray(index_codes.T)
    step = SCAN_BLOCK // max(1, len(index_codes))
    q_parts, row_parts, d_parts = [], [], []
    if step <= 1:
        for qi, query in enumerate(codes):
            d = np.add(
                np.bitwise_count(columns[0] ^ query[0]),
                np.bitwise_count(columns[1] ^ query[1]),
                dtype=np.uint16,
            )
            d += np.bitwise_count(columns[2] ^ query[2])
            d += np.bitwise_count(columns[3] ^ query[3])
            rows = np.flatnonzero(d <= radius)
            q_parts.append(np.full(len(rows), qi, np.intp))
            row_parts.append(rows)
            d_parts.append(d[rows])
    else:
        for start in range(0, len(codes), step):
            block = codes[start : start + step, :, None]
            d = np.add(
                np.bitwise_count(columns[0] ^ block[:, 0]),
                np.bitwise_count(columns[1] ^ block[:, 1]),
                dtype=np.uint16,
            )
            d += np.bitwise_count(columns[2] ^ block[:, 2])
            d += np.bitwise_count(columns[3] ^ block[:, 3])
            q, rows = np.nonzero(d <= radius)
            q_parts.append(q + start)
            row_parts.append(rows)
            d_parts.append(d[q, rows])
    if not q_parts:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0, np.uint16)
    return np.concatenate(q_parts), np.concatenate(row_parts), np.concatenate(d_parts)


def _group(n_queries: int, q: npt.NDArray[np.intp], ids: Ids, d: npt.NDArray[np.uint16]) -> Matches:
    """Per query, its (id, distance) pairs sorted by distance, then id."""
    order = np.lexsort((ids, d, q))
    q, ids, d = q[order], ids[order], d[order]
    bounds = np.searchsorted(q, np.arange(n_queries + 1))
    pairs = list(zip(ids.tolist(), d.tolist(), strict=True))
    return [pairs[bounds[i] : bounds[i + 1]] for i in range(n_queries)]
