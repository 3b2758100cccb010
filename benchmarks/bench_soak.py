"""Memory soak: one Kafka worker fed continuously, its RSS sampled every second.

A private broker and store as in bench_kafka; the mixed set of bench_e2e is submitted
over and over (a fresh id each time), all N refs at once, so the worker never idles
until the last verdict. The worker's own VmRSS (/proc/<pid>/status; its decoder sandbox
children are separate processes, replaced every few hundred items) is read once a
second. Growth is measured over the second half: RSS at 100% against RSS at 50% of the
items, as a fraction of the latter.

usage: python -m benchmarks.bench_soak [--quick] [--items N]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from itertools import cycle, islice
from pathlib import Path

from benchmarks import bench_e2e
from benchmarks._common import Report, Target, console
from benchmarks.bench_kafka import Run, media_server, private_services


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="about 400 items (~4 minutes)")
    ap.add_argument("--items", type=int, help="items to feed (default 400 quick, 2000 full)")
    args = ap.parse_args(argv)
    n = args.items or (400 if args.quick else 2000)
    # Quick: stills and the 720p clips only, 400 items in about 4 minutes: with camera-like
    # media the allocator takes a few hundred items to settle (800 items: +1.0% over the
    # second half; 200: +4.8%, still climbing).
    paths = [p for p in bench_e2e.media_set(quick=True) if not args.quick or "1080" not in p.name]
    samples: list[tuple[float, int, int]] = []  # (time, items done, RSS kB)
    done = 0
    with (
        tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp,
        private_services() as svc,
        media_server(bench_e2e.CACHE) as base,
    ):
        run = Run(svc, base, Path(tmp), threads=2, concurrency=2)
        try:
            run.start(1)
            worker = run.workers[0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    rss = worker.rss_kb()
                    if rss is not None:
                        samples.append((time.monotonic(), done, rss))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            urls = [f"{base}/{p.name}" for p in islice(cycle(paths), n)]
            t0 = time.monotonic()
            ids = set(run.submit(urls))

            def progress(count: int) -> None:
                nonlocal done
                if count // 50 > done // 50:
                    console.print(f"{count}/{n} items, RSS {worker.rss_kb()} kB")
                done = count

            run.collect(ids, timeout=120 + 10 * n, progress=progress)
            wall = time.monotonic() - t0
            stop.set()
            sampler.join()
        finally:
            run.stop()

    def rss_at(frac: float) -> float:
        """RSS (MB) at the first sample taken once `frac` of the items were done."""
        want = frac * n
        for _, d, rss in samples:
            if d >= want:
                return rss / 1024
        return samples[-1][2] / 1024

    points = {f"{int(f * 100)}%": rss_at(f) for f in (0.25, 0.5, 0.75, 1.0)}
    growth = (points["100%"] - points["50%"]) / points["50%"]
    report = Report(
        name="bench_soak",
        title=f"memory soak: one Kafka worker, {n} items, RSS of the worker process",
        columns=["point", "RSS MB"],
        params={"quick": args.quick, "items": n, "media": [p.name for p in paths]},
    )
    report.rows = [{"point": k, "RSS MB": v} for k, v in points.items()]
    report.rows.append({"point": "peak", "RSS MB": max(s[2] for s in samples) / 1024})
    report.targets = [Target("RSS growth over the second half", growth, 0.05, at_least=False)]
    report.notes = [
        f"{n} items in {wall:.0f} s ({n / wall:.2f} items/s); {len(samples)} RSS samples",
        "worker: models.threads=2, detect_concurrency=2, bundled models, nothing alerts; "
        "all refs submitted at the start",
    ]
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
