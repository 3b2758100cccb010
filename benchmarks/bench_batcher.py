"""The dynamic batcher under load: how full its batches are and what latency it adds.

A real backend (`sbi_face` on ONNX Runtime, built as the pipeline builds it) behind
`synthwatch.operators.batcher.Batcher` with the pipeline's defaults (max_batch 32,
max_delay_ms 10), fed by producer threads that submit one media item's face crops (1-3
rows) at Poisson arrival times, open loop, at a fraction of the backend's capacity.
Capacity is the backend's own items/s at max_batch, measured in the same run, before and
after the load runs (their mean is used).

Reported per arrival rate: the batch fill ratio (mean batch size / max_batch), the
latency the batcher adds (submit to result, minus the inference time of the batch that
completed the request; above capacity this is mostly queueing, which grows for as long
as the overload lasts), and throughput over capacity.

    python -m benchmarks.bench_batcher [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks._common import Report, Target, median_timed

MODEL = "sbi_face"
MAX_BATCH = 32
MAX_DELAY_MS = 10.0
"""`Settings.models.max_batch` and `max_delay_ms`: the pipeline's defaults."""
THREADS = 2
PRODUCERS = 2
LOADS = (0.1, 0.5, 1.0, 2.0)
"""Arrival rates as fractions of the backend's capacity at max_batch."""


def _backend() -> Any:
    import torch

    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.infer import OnnxRuntimeBackend
    from synthwatch.pipeline.settings import Settings

    torch.set_num_threads(THREADS)
    store = ModelStore(Settings().model_dir)
    return OnnxRuntimeBackend(store.onnx_path(MODEL), threads=THREADS), store.spec(MODEL)


def capacity(run: Any, batch: npt.NDArray[np.float32], seconds: float) -> float:
    """Items/s of the bare backend at this batch size (median of 3 samples)."""
    run(batch)
    t0 = time.perf_counter()
    run(batch)
    iters = max(1, round(seconds / max(time.perf_counter() - t0, 1e-4)))

    def loop() -> None:
        for _ in range(iters):
            run(batch)

    _, t = median_timed(loop, repeats=3)
    return len(batch) * iters / t.wall_s


def load_run(
    run: Any, shape: tuple[int, ...], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    """Feed the batcher `rate` items/s for `seconds`; wait for every result; measure."""
    from synthwatch.operators.batcher import Batcher

    last = threading.local()

    def timed_run(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        t0 = time.perf_counter()
        out: npt.NDArray[np.float32] = run(batch)
        # Futures resolve on the batcher thread right after this returns, so their
        # callbacks read the inference time of the batch that completed them.
        last.elapsed = time.perf_counter() - t0
        return out

    pool = np.random.default_rng(seed).random((3, *shape), dtype=np.float32)
    added: list[float] = []
    done_at: list[float] = []
    lock = threading.Lock()
    futures: list[Future[Any]] = []

    def on_done(t_submit: float) -> Any:
        def cb(_: Future[Any]) -> None:
            now = time.perf_counter()
            with lock:
                added.append(now - t_submit - last.elapsed)
                done_at.append(now)

        return cb

    submitted = [0]
    start = time.perf_counter() + 0.05
    with Batcher(timed_run, max_batch=MAX_BATCH, max_delay_ms=MAX_DELAY_MS) as batcher:

        def producer(k: int) -> None:
            rng = np.random.default_rng(seed * 100 + k)
            # Mean request size 2 rows: the producer's request rate gives `rate` items/s.
            per_s = rate / PRODUCERS / 2.0
            t = start
            mine: list[Future[Any]] = []
            while True:
                t += rng.exponential(1.0 / per_s)
                if t - start > seconds:
                    break
                delay = t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                n = int(rng.integers(1, 4))
                t_submit = time.perf_counter()
                fut = batcher.submit(pool[:n])
                fut.add_done_callback(on_done(t_submit))
                mine.append(fut)
                with lock:
                    submitted[0] += n
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(PRODUCERS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for fut in futures:
            fut.result()
        sizes = list(batcher.stats.recent_sizes)
        items = batcher.stats.items
    wall = max(done_at) - start
    return {
        "items": items,
        "submitted": submitted[0],
        "batches": len(sizes),
        "mean_batch": statistics.fmean(sizes),
        "fill": statistics.fmean(sizes) / MAX_BATCH,
        "added_p50_ms": 1000 * float(np.percentile(added, 50)),
        "added_p95_ms": 1000 * float(np.percentile(added, 95)),
        "throughput": items / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batcher")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else 8.0

    backend, spec = _backend()
    full = np.random.default_rng(0).random((MAX_BATCH, *spec.input_shape), dtype=np.float32)
    cap_before = capacity(backend.run, full, 0.5)
    runs = [
        (load, load_run(backend.run, spec.input_shape, load * cap_before, seconds, seed=i))
        for i, load in enumerate(LOADS)
    ]
    cap_after = capacity(backend.run, full, 0.5)
    cap = (cap_before + cap_after) / 2
    backend.close()

    report = Report(
        name="batcher",
        title=(
            f"Dynamic batcher, {MODEL} on ONNX Runtime, max_batch {MAX_BATCH}, "
            f"max_delay {MAX_DELAY_MS:g} ms, capacity {cap:.0f} items/s"
        ),
        columns=["arrival", "mean batch", "fill", "added p50 ms", "added p95 ms", "thr/cap"],
        params={
            "quick": args.quick,
            "model": MODEL,
            "max_batch": MAX_BATCH,
            "max_delay_ms": MAX_DELAY_MS,
            "threads": THREADS,
            "producers": PRODUCERS,
            "seconds_per_load": seconds,
            "capacity_before": cap_before,
            "capacity_after": cap_after,
        },
    )
    for load, r in runs:
        report.rows.append(
            {
                "arrival": f"{load:.0%} of capacity",
                "mean batch": r["mean_batch"],
                "fill": r["fill"],
                "added p50 ms": r["added_p50_ms"],
                "added p95 ms": r["added_p95_ms"],
                "thr/cap": r["throughput"] / cap,
                "load": load,
                "arrival_items_per_s": load * cap_before,
                **r,
            }
        )
    saturated = [r["fill"] for load, r in runs if load >= 1.0]
    report.targets.append(Target("batch fill under saturating load (min)", min(saturated), 0.9))
    report.notes += [
        "added latency = submit to result minus the inference time of the batch that "
        "completed the request; above capacity it is mostly the queue, which grows for "
        "as long as the overload lasts",
        f"capacity varied {abs(cap_after - cap_before) / cap:.0%} between the measurements "
        "before and after the load runs",
    ]
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
