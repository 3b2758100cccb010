"""The dynamic batcher packs rows from concurrent callers and returns each its own scores."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from synthwatch.operators.batcher import Batcher


def _row_ids(batch: np.ndarray) -> np.ndarray:
    # A "model" whose score is the row's own id: lets a test check every caller
    # got back exactly its rows, in order.
    return batch[:, 0].astype(np.float32)


def test_concurrent_callers_share_batches_and_get_their_own_scores() -> None:
    seen: list[int] = []
    with Batcher(
        _row_ids, max_batch=16, max_delay_ms=50, on_batch=lambda n, s: seen.append(n)
    ) as b:
        results: dict[int, np.ndarray] = {}

        def caller(k: int) -> None:
            rows = np.arange(k * 100, k * 100 + 3, dtype=np.float32).reshape(3, 1)
            results[k] = b.run(rows)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k in range(8):
        assert results[k].tolist() == [k * 100, k * 100 + 1, k * 100 + 2]
    assert sum(seen) == 24
    assert max(seen) <= 16
    assert len(seen) < 8, "rows from different callers should share batches"


def test_a_request_larger_than_max_batch_is_split() -> None:
    sizes: list[int] = []
    with Batcher(_row_ids, max_batch=4, max_delay_ms=1, on_batch=lambda n, s: sizes.append(n)) as b:
        out = b.run(np.arange(10, dtype=np.float32).reshape(10, 1))
    assert out.tolist() == list(range(10))
    assert sizes == [4, 4, 2]


def test_a_lone_item_is_not_held_waiting_for_a_full_batch() -> None:
    with Batcher(_row_ids, max_batch=64, max_delay_ms=30) as b:
        t0 = time.monotonic()
        b.run(np.zeros((1, 1), dtype=np.float32))
        waited = time.monotonic() - t0
    # Not a timing threshold on speed: the bound is the contract (size OR time).
    assert waited < 5.0


def test_model_failure_reaches_every_caller_in_the_batch() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")

    with Batcher(broken, max_batch=8, max_delay_ms=1) as b:
        fut = b.submit(np.zeros((2, 1), dtype=np.float32))
        with pytest.raises(RuntimeError, match="out of memory"):
            fut.result(timeout=5)
        # The batcher survives a failed batch.
    with Batcher(_row_ids, max_batch=8, max_delay_ms=1) as b2:
        assert b2.run(np.ones((1, 1), dtype=np.float32)).tolist() == [1.0]


def test_wrong_number_of_scores_is_an_error_not_a_silent_misalignment() -> None:
    def short(batch: np.ndarray) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    with (
        Batcher(short, max_batch=8, max_delay_ms=1) as b,
        pytest.raises(RuntimeError, match="scores for"),
    ):
        b.run(np.zeros((3, 1), dtype=np.float32))
