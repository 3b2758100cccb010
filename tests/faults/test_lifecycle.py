"""Shutdown, slow batches and group membership changes, against the real broker."""

from __future__ import annotations

import time
from typing import Any

from tests.faults.conftest import Run


def test_sigterm_mid_batch_exits_in_the_grace_period_committed_and_out_of_the_group(
    run: Run, s3: Any, bucket: str
) -> None:
    worker = run.start_worker(faults=("detect.before=sleep:6",))
    ids = set(run.submit(run.images(3)))
    worker.wait_event("fault point: sleeping")  # a record is mid-detection

    t0 = time.monotonic()
    assert worker.terminate(timeout=60) == 0, worker.tail()
    assert time.monotonic() - t0 < 30, "SIGTERM took longer than a Kubernetes grace period"

    group = run.group()
    assert group["members"] == 0, group  # left the group, not timed out of it
    refs_end = run.end_offsets("refs")
    # Every ref was fetched before the stop: its offsets are committed, none re-fetched.
    assert all(group["offsets"].get(tp) == end for tp, end in refs_end.items()), group

    run.start_worker()  # what was handed back is redone; nothing is lost
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=120, settle=2.0)
    run.stop_all()
    run.assert_whole(ledger, ids, s3, bucket)


def test_a_batch_slower_than_the_poll_interval_keeps_membership_and_commits_once(
    run: Run, s3: Any, bucket: str
) -> None:
    # Each record takes 12 s in detection against a 6 s poll interval: the consumer
    # keeps polling (the work runs off the event loop), so no rebalance, no commit of a
    # stale generation, and no record delivered twice.
    worker = run.start_worker(
        faults=("detect.before=sleep:12",), SYNTHWATCH_KAFKA__MAX_POLL_INTERVAL_S="6"
    )
    ids = set(run.submit(run.images(2)))
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=150, settle=8.0)
    assert worker.proc.poll() is None, worker.tail()
    run.assert_whole(ledger, ids, s3, bucket)
    assert ledger.duplicates() == {}, "a slow record was delivered again"
    log = worker.log.read_text(errors="replace")
    assert "CommitFailedError" not in log and "IllegalGeneration" not in log
    group = run.group()
    assert group["members"] == 1
    fetched_end = run.end_offsets("fetched")
    assert all(group["offsets"].get(tp) == end for tp, end in fetched_end.items()), group
    run.stop_all()


def test_a_worker_joining_and_leaving_mid_run_skips_nothing(run: Run, s3: Any, bucket: str) -> None:
    run.partitions = 4
    first = run.start_worker(faults=("detect.before=sleep:1",))
    ids = set(run.submit(run.images(12)))
    run.collect(lambda led: len(led.verdicts) >= 2, timeout=120)
    second = run.start_worker(faults=("detect.before=sleep:1",))  # joins: rebalance
    run.collect(lambda led: len(led.verdicts) >= 6, timeout=120)
    assert second.terminate() == 0, second.tail()  # leaves: rebalance again
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=180, settle=3.0)
    assert first.proc.poll() is None, first.tail()
    run.stop_all()
    run.assert_whole(ledger, ids, s3, bucket)
    # At-least-once across a rebalance: a record is done again at most once.
    assert all(n <= 2 for n in ledger.duplicates().values()), ledger.duplicates()


def test_a_worker_without_partitions_says_not_ready(run: Run) -> None:
    run.partitions = 1
    first = run.start_worker()
    spare = run.start_worker(wait=False)  # the group has one partition, held by `first`
    time.sleep(5)
    body = spare.wait_health("ready", 503, timeout=60)
    assert body["partitions"] == 0 and body["ready"] is False, body
    live = spare.health("live")
    assert live is not None and live.status_code == 200, "idle is not stalled"
    # refs, fetched, verdicts and retry: one partition each, all held by `first`.
    assert first.wait_health("ready", 200)["partitions"] == 4
    run.stop_all()
