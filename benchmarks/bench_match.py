"""Matching PDQ hashes against a list of known fakes: queries/s of the index against a scan.

Ours is `synthwatch.operators.hashindex.HammingIndex` (multi-index hashing, 16 substrings
of 16 bits); the baseline is `hashindex.brute_force`, one vectorised numpy pass over every
entry per query (XOR of the four words, `np.bitwise_count`). Both answer radius 31
(`phash.MATCH_DISTANCE`) over the same lists of 1k, 100k and 1M entries: uniformly random
256-bit codes, with near-duplicates planted for half the queries (each such query is an
entry with 0 to 40 of its bits flipped, so most of them hit and some fall just outside);
the other half are random codes, which match nothing. Queries go in batches of 1,000 (a
list re-check) and of 16 (one video's sampled frames, as a scan submits them).

Timings are medians of `--repeats` runs, ours and the scan interleaved; "vs brute" is
ours over the scan's queries/s measured in the same run. "build s" is adding the whole
list to an empty index (the tables built from it); "add us/entry" is adding 64 further
batches of 1,000 (each lands in the delta; the merges the delta's bound triggers are
counted in). "B/entry" is the arrays' bytes over the entries (the scan keeps codes and
ids: 40 B). Recall: every query's answer must equal the scan's, ids and distances, in
order; the script fails otherwise. At 100k and 1M in the full run, the same queries also
go through indexes with other substring counts: the measurement the default of 16 was
chosen on. At 1k the index holds the whole list in its delta (under 4,096 entries), so it
scans too.

    python -m benchmarks.bench_match [--quick] [--sizes 1000,100000,1000000] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks._common import Report, Target
from synthwatch.operators.hashindex import HammingIndex, brute_force
from synthwatch.operators.phash import MATCH_DISTANCE

Codes = npt.NDArray[np.uint64]

SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 100_000)
QUERIES = 1_000
SMALL_BATCH = 16
"""A video item's frames: `SampleSettings.frames` is 16."""
SWEEP = (8, 12, 14, 16, 18, 32)
SWEEP_FROM = 100_000
"""Substring counts compared in the full run, at sizes from SWEEP_FROM (below it the
whole list sits in the delta, which is scanned)."""
COLUMNS = [
    "entries",
    "method",
    "batch",
    "queries/s",
    "vs brute",
    "build s",
    "add us/entry",
    "B/entry",
    "hits/query",
    "recall",
]


def workload(n: int, seed: int) -> tuple[Codes, npt.NDArray[np.int64], Codes]:
    """(index codes, ids, queries): random codes; half the queries are entries with 0-40
    bits flipped, half random."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64)
    ids = rng.permutation(n).astype(np.int64)
    near = codes[rng.integers(0, n, QUERIES // 2)].copy()
    for row in near:
        for bit in rng.choice(256, int(rng.integers(0, 41)), replace=False):
            row[bit // 64] ^= np.uint64(1 << (63 - bit % 64))
    far = rng.integers(0, 2**64, size=(QUERIES - len(near), 4), dtype=np.uint64)
    queries = np.concatenate([near, far])
    return codes, ids, queries[rng.permutation(len(queries))]


def batched(search: Callable[[Codes], Any], queries: Codes, batch: int) -> Callable[[], None]:
    def run() -> None:
        for start in range(0, len(queries), batch):
            search(queries[start : start + batch])

    return run


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each run, the runs taking turns (order flipped each round)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats):
        for key in list(runs) if i % 2 == 0 else list(reversed(runs)):
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def build(codes: Codes, ids: npt.NDArray[np.int64], substrings: int) -> tuple[HammingIndex, float]:
    index = HammingIndex(substrings=substrings)
    t0 = time.perf_counter()
    index.add(codes, ids)
    return index, time.perf_counter() - t0


def add_cost(codes: Codes, ids: npt.NDArray[np.int64], seed: int) -> float:
    """Microseconds per entry of 64 adds of 1,000 to an index already holding `codes`."""
    index, _ = build(codes, ids, 16)
    rng = np.random.default_rng(seed + 1)
    extra = rng.integers(0, 2**64, size=(64_000, 4), dtype=np.uint64)
    extra_ids = np.arange(len(codes), len(codes) + len(extra), dtype=np.int64)
    t0 = time.perf_counter()
    for start in range(0, len(extra), 1_000):
        index.add(extra[start : start + 1_000], extra_ids[start : start + 1_000])
    return (time.perf_counter() - t0) / len(extra) * 1e6


def measure(n: int, repeats: int, sweep: tuple[int, ...]) -> tuple[list[dict[str, Any]], bool]:
    """Rows for one list size, and whether every answer equalled the scan's."""
    codes, ids, queries = workload(n, seed=n)
    indexes = {m: build(codes, ids, m) for m in sorted({16, *sweep})}
    index = indexes[16][0]
    truth = brute_force(queries, codes, ids, MATCH_DISTANCE)
    recall = {m: ix.search(queries) == truth for m, (ix, _) in indexes.items()}
    small = batched(index.search, queries, SMALL_BATCH)
    runs: dict[str, Callable[[], None]] = {
        "brute": batched(lambda q: brute_force(q, codes, ids, MATCH_DISTANCE), queries, QUERIES),
        "ours": batched(index.search, queries, QUERIES),
        "ours-16": small,
    }
    for m in sweep:
        if m != 16:
            runs[f"m{m}"] = batched(indexes[m][0].search, queries, QUERIES)
    wall = interleaved(runs, repeats)
    qps = {k: QUERIES / s for k, s in wall.items()}
    hits = sum(map(len, truth)) / QUERIES
    rows: list[dict[str, Any]] = [
        {
            "entries": n,
            "method": "brute force (numpy scan)",
            "batch": QUERIES,
            "queries/s": qps["brute"],
            "vs brute": 1.0,
            "B/entry": (codes.nbytes + ids.nbytes) / n,
            "hits/query": hits,
            "recall": 1.0,
        },
        {
            "entries": n,
            "method": "HammingIndex (m=16)",
            "batch": QUERIES,
            "queries/s": qps["ours"],
            "vs brute": qps["ours"] / qps["brute"],
            "build s": indexes[16][1],
            "add us/entry": add_cost(codes, ids, seed=n),
            "B/entry": index.nbytes / n,
            "hits/query": hits,
            "recall": float(recall[16]),
        },
        {
            "entries": n,
            "method": "HammingIndex (m=16)",
            "batch": SMALL_BATCH,
            "queries/s": qps["ours-16"],
            "vs brute": qps["ours-16"] / qps["brute"],
            "hits/query": hits,
            "recall": float(recall[16]),
        },
    ]
    for m in sweep:
        if m != 16:
            rows.append(
                {
                    "entries": n,
                    "method": f"HammingIndex (m={m})",
                    "batch": QUERIES,
                    "queries/s": qps[f"m{m}"],
                    "vs brute": qps[f"m{m}"] / qps["brute"],
                    "build s": indexes[m][1],
                    "B/entry": indexes[m][0].nbytes / n,
                    "hits/query": hits,
                    "recall": float(recall[m]),
                }
            )
    return rows, all(recall.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 100k entries, 3 repeats")
    ap.add_argument("--sizes", default="", help="comma-separated list sizes (entries)")
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per configuration")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    sizes = sizes or list(QUICK_SIZES if args.quick else SIZES)
    repeats = args.repeats or (3 if args.quick else 5)

    rows: list[dict[str, Any]] = []
    exact = True
    for n in sizes:
        sweep = SWEEP if not args.quick and n >= SWEEP_FROM else ()
        size_rows, size_exact = measure(n, repeats, sweep)
        rows += size_rows
        exact = exact and size_exact
    report = Report(
        name="match",
        title=(
            f"PDQ matching at radius {MATCH_DISTANCE}: HammingIndex vs a numpy scan, "
            f"{QUERIES} queries (medians of {repeats}, interleaved)"
        ),
        columns=COLUMNS,
        rows=rows,
        targets=[Target("every answer equals brute force (recall 1)", float(exact), 1.0)],
        notes=[
            "codes uniformly random; half the queries an entry with 0-40 bits flipped, half random",
            "one thread; 'vs brute' is queries/s over the scan's in the same run",
            "m: substrings per code (256/m bits each); m=16 is the default",
        ],
        params={"sizes": sizes, "queries": QUERIES, "repeats": repeats, "sweep": list(SWEEP)},
    )
    report.save()
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
