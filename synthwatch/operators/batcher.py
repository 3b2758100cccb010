"""Dynamic batching across media items, so the accelerator sees full batches.

Callers from many threads submit a few crops each (one media item's faces); one
thread packs them into batches of at most `max_batch`, waiting at most `max_delay_ms`
after the first waiting crop for more to arrive, like Triton's dynamic batcher. A
batch is always bounded by both size and time: without the time bound, a lone item
on a quiet feed would wait forever for company.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

BatchFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
"""Runs one batch (N, ...) and returns one score per row, shape (N,)."""


@dataclass
class _Request:
    items: npt.NDArray[np.float32]
    future: Future[npt.NDArray[np.float32]]
    scores: npt.NDArray[np.float32]
    sent: int = 0
    done: int = 0
    failed: bool = False


@dataclass
class BatchStats:
    """Counters a caller can read for metrics and benchmarks."""

    batches: int = 0
    items: int = 0
    recent_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    """The last few thousand batch sizes (bounded, so a long-running worker does not grow)."""


class BatcherClosed(RuntimeError):
    """`submit` after `close`."""


class Batcher:
    """Packs submitted rows into batches for `fn`; thread-safe.

    `on_batch(size, seconds)` is called after every batch (metrics hook; must be cheap).
    If `fn` raises, every request with a row in that batch gets the exception.
    """

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch: int,
        max_delay_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must be >= 0")
        self._fn = fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: npt.NDArray[np.float32]) -> Future[npt.NDArray[np.float32]]:
        """Queue rows (N, ...); the future resolves to their N scores in order."""
        fut: Future[npt.NDArray[np.float32]] = Future()
        if len(items) == 0:
            fut.set_result(np.zeros((0,), dtype=np.float32))
            return fut
        req = _Request(items=items, future=fut, scores=np.empty((len(items),), dtype=np.float32))
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._queue.append(req)
            self._cond.notify()
        return fut

    def run(self, items: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Submit and wait."""
        return self.submit(items).result()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pending_rows(self) -> int:
        return sum(len(r.items) - r.sent for r in self._queue)

    def _take_batch(self) -> list[tuple[_Request, int, int]] | None:
        """Wait for work, then for a full batch or the delay; None when closed and drained."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_delay_s
            while not self._closed and self._pending_rows() < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            parts: list[tuple[_Request, int, int]] = []
            room = self.max_batch
            while self._queue and room > 0:
                req = self._queue[0]
                n = min(room, len(req.items) - req.sent)
                parts.append((req, req.sent, req.sent + n))
                req.sent += n
                room -= n
                if req.sent == len(req.items):
                    self._queue.popleft()
            return parts

    def _loop(self) -> None:
        while True:
            parts = self._take_batch()
            if parts is None:
                return
            batch = np.concatenate([r.items[a:b] for r, a, b in parts], axis=0)
            t0 = time.perf_counter()
            try:
                scores = np.asarray(self._fn(batch), dtype=np.float32).reshape(-1)
                if len(scores) != len(batch):
                    raise RuntimeError(f"model returned {len(scores)} scores for {len(batch)} rows")
            except BaseException as exc:  # delivered to every waiting caller, never lost
                for req, _, _ in parts:
                    if not req.failed and not req.future.done():
                        req.failed = True
                        req.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.recent_sizes.append(len(batch))
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
            pos = 0
            for req, a, b in parts:
                n = b - a
                req.scores[a:b] = scores[pos : pos + n]
                pos += n
                req.done += n
                if req.done == len(req.items) and not req.failed:
                    req.future.set_result(req.scores)
