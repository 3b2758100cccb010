"""The broker and the store go away mid-run and come back: the worker stays up, says
it is not ready meanwhile, and finishes everything without burning records into the DLQ."""

from __future__ import annotations

import time
from typing import Any

from tests.faults.conftest import PrivateServices, Run


def test_broker_stopped_and_restarted_mid_run(
    run: Run, fault_services: PrivateServices, s3: Any, bucket: str
) -> None:
    worker = run.start_worker(faults=("detect.before=sleep:1",))
    ids = set(run.submit(run.images(6)))
    run.collect(lambda led: len(led.verdicts) >= 1, timeout=120)
    fault_services.stop("kafka")
    try:
        body = worker.wait_health("ready", 503, timeout=30)
        assert "kafka" in body.get("down", {}), body
        live = worker.health("live")
        assert live is not None and live.status_code == 200, "liveness must not track the broker"
        time.sleep(5)
        assert worker.proc.poll() is None, worker.tail()
    finally:
        fault_services.start()
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=240, settle=3.0)
    assert worker.proc.poll() is None, worker.tail()
    worker.wait_health("ready", 200, timeout=60)
    run.stop_all()
    run.assert_whole(ledger, ids, s3, bucket)
    assert not ledger.dlq, ledger.dlq


def test_store_down_longer_than_the_retry_budget_pauses_then_resumes(
    run: Run, fault_services: PrivateServices, s3: Any, bucket: str
) -> None:
    worker = run.start_worker()
    fault_services.stop("s3")
    try:
        ids = set(run.submit(run.images(3)))
        body = worker.wait_health("ready", 503, timeout=60)
        assert "s3" in body.get("down", {}), body
        worker.wait_event("object store unreachable: stage paused until it answers")
        time.sleep(8)  # well past the in-place retry budget (3 attempts, < 2 s)
        assert worker.proc.poll() is None, worker.tail()
        live = worker.health("live")
        assert live is not None and live.status_code == 200, "a paused stage is not a stall"
    finally:
        fault_services.start()
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=240, settle=3.0)
    worker.wait_health("ready", 200, timeout=60)
    run.stop_all()
    assert not ledger.dlq, "an outage of our own store must not dead-letter the feed"
    run.assert_whole(ledger, ids, s3, bucket)


def test_a_worker_started_while_the_store_is_down_waits_for_it(
    run: Run, fault_services: PrivateServices, s3: Any, bucket: str
) -> None:
    # A faust task that raises crashes the app: creating the bucket at start must treat
    # a store that is down as an outage (not ready, retried), not crash the worker.
    fault_services.stop("s3")
    try:
        worker = run.start_worker(wait=False)
        worker.wait_event("object store unavailable at start: retrying", timeout=120)
        body = worker.wait_health("ready", 503, timeout=60)
        assert "s3" in body.get("down", {}), body
        time.sleep(5)
        assert worker.proc.poll() is None, worker.tail()
    finally:
        fault_services.start()
    worker.wait_event("object store answers again: bucket ready", timeout=120)
    ids = set(run.submit(run.images(2)))
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=240, settle=3.0)
    worker.wait_health("ready", 200, timeout=60)
    run.stop_all()
    assert not ledger.dlq, ledger.dlq
    run.assert_whole(ledger, ids, s3, bucket)


def test_a_broker_outage_longer_than_a_send_loses_no_record(
    run: Run, fault_services: PrivateServices, s3: Any, bucket: str
) -> None:
    # Sends give up after 3 s here (20 minutes by default). Records finish detection
    # while the broker is away, so their verdict sends fail, more than once. Such a
    # failure is the broker's, not the record's: the stage must keep the record and
    # send again, not route it to the DLQ (which is unreachable too) and not let the
    # agent crash (faust then acknowledges the record it crashed on: lost).
    worker = run.start_worker(
        faults=("detect.before=sleep:4",), SYNTHWATCH_KAFKA__PRODUCER_REQUEST_TIMEOUT_S="3"
    )
    ids = set(run.submit(run.images(4)))
    run.collect(lambda led: len(led.verdicts) >= 1, timeout=120)
    fault_services.stop("kafka")
    try:
        time.sleep(15)
        assert worker.proc.poll() is None, worker.tail()
    finally:
        fault_services.start()
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=240, settle=3.0)
    assert worker.proc.poll() is None, worker.tail()
    run.stop_all()
    run.assert_whole(ledger, ids, s3, bucket)
    assert not ledger.dlq, ledger.dlq
