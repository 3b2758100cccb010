"""The small parts the fault suite leans on: fault-point specs, backoff, the watchdog,
the attempt header."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from aiokafka.errors import (
    KafkaConnectionError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
)
from faust.exceptions import ProducerSendError

from synthwatch.errors import TooLarge, is_permanent
from synthwatch.operators.backoff import backoff
from synthwatch.pipeline.faults import POINTS, FaultPoints
from synthwatch.pipeline.health import InFlight, Watchdog
from synthwatch.pipeline.routing import ATTEMPT_HEADER, attempt_of
from synthwatch.pipeline.settings import Settings


@pytest.mark.parametrize(
    "spec",
    [
        "decide.after_evidence",  # no action
        "decide.after_evidenc=kill",  # typo in the point
        "detect.before=explode",
        "detect.before=sleep:soon",
        "detect.before=sleep:-1",
        "decide.after_alert=sleep:5",  # on the event loop: kill only
        "detect.before@=sleep:1",  # a record named by nothing
    ],
)
def test_a_bad_fault_spec_is_refused_rather_than_arming_nothing(spec: str) -> None:
    with pytest.raises(ValueError, match="fault point"):
        FaultPoints([spec])


def test_unarmed_points_do_nothing_and_sleep_points_sleep() -> None:
    assert not FaultPoints().armed
    for point in POINTS:
        FaultPoints().hit(point)  # returns: nothing armed
    armed = FaultPoints(["detect.before=sleep:0.2"])
    t0 = time.monotonic()
    armed.hit("detect.before")
    assert time.monotonic() - t0 >= 0.2
    armed.hit("decide.after_alert")  # another point: no effect


def test_a_point_armed_for_one_record_stalls_that_record_only() -> None:
    armed = FaultPoints(["detect.before@slow-one=sleep:0.3"])
    t0 = time.monotonic()
    with structlog.contextvars.bound_contextvars(id="another"):
        armed.hit("detect.before")
    assert time.monotonic() - t0 < 0.3
    with structlog.contextvars.bound_contextvars(id="slow-one"):
        armed.hit("detect.before")
    assert time.monotonic() - t0 >= 0.3


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    rng = random.Random(1)
    draws = [[backoff(n, 0.5, 5.0, rng) for _ in range(2000)] for n in (1, 2, 3, 8)]
    assert [max(d) for d in draws] == pytest.approx([0.5, 1.0, 2.0, 5.0], rel=0.01)
    assert all(min(d) < 0.05 * max(d) for d in draws)  # jitter reaches down to ~0
    # The retry agent derives its delay from (id, attempt): a redelivery waits the same.
    assert backoff(3, 1.0, 60.0, random.Random("id:3")) == backoff(
        3, 1.0, 60.0, random.Random("id:3")
    )


def test_watchdog_reports_a_stall_only_while_work_is_pending() -> None:
    dog = Watchdog(stall_s=0.1)
    time.sleep(0.15)
    assert dog.stalled_for() == 0.0  # idle is not stalled
    dog.started()
    assert dog.stalled_for() == 0.0
    time.sleep(0.15)
    assert dog.stalled_for() > 0.1
    dog.beat()  # a stage paused on an outage beats on every probe
    assert dog.stalled_for() == 0.0
    dog.finished()
    time.sleep(0.15)
    assert dog.stalled_for() == 0.0


def test_oldest_in_flight_follows_the_oldest_unfinished_record_of_each_stage() -> None:
    now = [100.0]
    flight = InFlight(clock=lambda: now[0])
    assert flight.oldest_s("detect") == 0.0  # nothing taken yet
    slow = flight.start("detect")
    now[0] = 130.0
    fast = flight.start("detect")
    fetch = flight.start("fetch")
    now[0] = 160.0
    # A later record finishing does not hide the one still going since 100.
    flight.finish("detect", fast)
    assert flight.oldest_s("detect") == 60.0
    assert flight.oldest_s("fetch") == 30.0
    flight.finish("detect", slow)
    assert flight.oldest_s("detect") == 0.0
    flight.finish("fetch", fetch)
    flight.finish("fetch", fetch)  # finishing twice (a retried finally) changes nothing
    assert flight.oldest_s("fetch") == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 0),
        ([], 0),
        ([(ATTEMPT_HEADER, b"3")], 3),
        ({ATTEMPT_HEADER: b"2"}, 2),
        ([("other", b"9"), (ATTEMPT_HEADER, b"1")], 1),
        ([(ATTEMPT_HEADER, b"lots")], 0),  # a foreign producer's header is not trusted
        ([(ATTEMPT_HEADER, b"-4")], 0),
    ],
)
def test_attempt_header_is_read_defensively(headers: object, expected: int) -> None:
    assert attempt_of(SimpleNamespace(headers=headers)) == expected


def test_the_sink_endpoint_reads_down_only_on_signs_of_its_own_trouble() -> None:
    from synthwatch.operators.webhook import Attempt
    from synthwatch.pipeline import metrics
    from synthwatch.pipeline.topology import _count_delivery

    gauge = metrics.DEPENDENCY_UP.labels("sink")
    for status, outcome, up in [
        (200, "delivered", 1),
        (503, "retried", 0),
        (None, "retried", 0),  # refused, timed out
        (400, "dead_lettered", 1),  # this alert's fault: the endpoint answered
        (429, "retried", 0),
    ]:
        _count_delivery(Attempt(1, outcome, "ocsf", status, "x"))  # type: ignore[arg-type]
        assert gauge._value.get() == up, status


def test_lag_of_a_partition_lost_in_a_rebalance_is_no_longer_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from prometheus_client import generate_latest

    from synthwatch.pipeline.topology import Pipeline

    TP = namedtuple("TP", "topic partition")
    assignment = {TP("lagtest.fetched", 0), TP("lagtest.fetched", 1)}

    class Consumer:
        def __init__(self) -> None:
            self._committed_offset = {tp: 5 for tp in assignment}

        def assignment(self) -> set[object]:
            return assignment

        def highwater(self, tp: object) -> int:
            return 12

        async def position(self, tp: object) -> int:
            return 5

    pipeline = Pipeline(Settings(work_dir=tmp_path, model_dir=tmp_path), "decide")
    monkeypatch.setattr(type(pipeline.app), "consumer", property(lambda self: Consumer()))
    try:
        asyncio.run(pipeline.health.measure_lag(pipeline.app.consumer))
        text = generate_latest().decode()
        assert 'synthwatch_consumer_lag{partition="1",topic="lagtest.fetched"} 7.0' in text
        assignment.discard(TP("lagtest.fetched", 1))  # handed to another worker
        asyncio.run(pipeline.health.measure_lag(pipeline.app.consumer))
        text = generate_latest().decode()
        assert 'synthwatch_consumer_lag{partition="0",topic="lagtest.fetched"} 7.0' in text
        assert 'partition="1",topic="lagtest.fetched"' not in text
    finally:
        pipeline.close()


class _Topic:
    """A faust topic whose sends fail with `errors`, in order, then succeed."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.sent: list[bytes] = []

    def get_topic_name(self) -> str:
        return "media.verdicts"

    async def send(self, *, key: bytes, value: bytes, headers: object) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.errors:
            fut.set_exception(self.errors.pop(0))
        else:
            self.sent.append(value)
            fut.set_result(None)
        return fut


def _send_error(cause: BaseException) -> ProducerSendError:
    try:
        raise ProducerSendError(f"Error while sending: {cause!r}") from cause
    except ProducerSendError as exc:
        return exc


def test_a_send_the_broker_fails_is_sent_again_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synthwatch.pipeline import routing, topology

    monkeypatch.setattr(routing, "backoff", lambda *a, **k: 0.0)
    pipeline = topology.Pipeline(Settings(work_dir=tmp_path, model_dir=tmp_path), "decide")
    try:
        topic = _Topic(KafkaConnectionError(), _send_error(LeaderNotAvailableError()))
        asyncio.run(pipeline.router.send(topic, b"k", b"verdict", []))
        assert topic.sent == [b"verdict"]  # once, after two failed sends
        assert "kafka" in pipeline.health.down  # not ready while the broker fails sends
    finally:
        pipeline.close()


def test_a_record_the_broker_refuses_for_its_size_is_a_permanent_failure(
    tmp_path: Path,
) -> None:
    from synthwatch.pipeline import topology

    pipeline = topology.Pipeline(Settings(work_dir=tmp_path, model_dir=tmp_path), "decide")
    try:
        topic = _Topic(_send_error(MessageSizeTooLargeError()))
        with pytest.raises(TooLarge, match="for its size") as err:
            asyncio.run(pipeline.router.send(topic, b"k", b"x" * 10, []))
        assert is_permanent(err.value)
        assert topic.sent == []
    finally:
        pipeline.close()


def test_a_dead_letter_too_large_for_the_broker_is_sent_without_its_original(
    tmp_path: Path,
) -> None:
    from synthwatch.pipeline import topology
    from synthwatch.schemas import DeadLetter, decode

    pipeline = topology.Pipeline(Settings(work_dir=tmp_path, model_dir=tmp_path), "decide")
    try:
        dlq = _Topic(_send_error(MessageSizeTooLargeError()))
        pipeline.router.dlq = dlq
        event = SimpleNamespace(
            key=b"media-1",
            value=b'{"big": "' + b"x" * 1000 + b'"}',
            message=SimpleNamespace(topic="media.verdicts", partition=3, offset=41, headers=[]),
        )
        asyncio.run(pipeline.router.dead_letter("decide", event, "internal", "boom", 0))
        (sent,) = dlq.sent
        letter = decode(sent, DeadLetter)
        assert letter.original == ""  # dropped: it made the record too large
        assert (letter.id, letter.topic, letter.partition, letter.offset) == (
            "media-1",
            "media.verdicts",
            3,
            41,
        )
    finally:
        pipeline.close()


def _event(n: int) -> SimpleNamespace:
    return SimpleNamespace(
        key=f"media-{n}".encode(),
        value=b'{"id": "x"}',
        message=SimpleNamespace(topic="media.fetched", partition=0, offset=n, headers=[]),
    )


def test_the_dlq_guard_counts_runs_and_shares_of_failures_that_blame_a_deploy() -> None:
    from synthwatch.pipeline.routing import DlqLimit

    limit = DlqLimit(max_consecutive=3, max_ratio=0.5, window=10)
    for _ in range(3):
        assert limit.exceeded("detect") is None
        limit.record("detect", guarded=True)
    assert "3 records in a row" in (limit.exceeded("detect") or "")
    assert limit.exceeded("fetch") is None  # per stage
    limit.record("detect", guarded=False)  # one good record ends the run
    assert limit.exceeded("detect") is None
    for guarded in [True, False, True, True, False, True, True]:  # 7 of the last 10: 70 %
        limit.record("detect", guarded=guarded)
    assert "70% of the last 10" in (limit.exceeded("detect") or "")
    assert DlqLimit().exceeded("detect") is None  # 0: no limit


def test_a_stage_over_its_dlq_limit_stops_instead_of_draining_into_the_dlq(
    tmp_path: Path,
) -> None:
    from synthwatch.pipeline import topology
    from synthwatch.pipeline.routing import GUARD_NAME

    settings = Settings(
        work_dir=tmp_path,
        model_dir=tmp_path,
        retry={"dlq_limit_consecutive": 2, "dlq_limit_ratio": 0},  # type: ignore[arg-type]
    )
    pipeline = topology.Pipeline(settings, "decide")
    try:
        dlq = _Topic()
        pipeline.router.dlq = dlq
        # Broken inputs are what the DLQ is for: any number of them goes there.
        for n in range(5):
            asyncio.run(pipeline.router.dead_letter("detect", _event(n), "corrupt_media", "x", 0))
        assert len(dlq.sent) == 5 and not pipeline.health.down
        # A bug that fails every record: two reach the DLQ, the third stops the stage.
        for n in range(2):
            asyncio.run(pipeline.router.dead_letter("detect", _event(n), "internal", "bug", 0))
        assert len(dlq.sent) == 7

        async def third() -> None:
            await asyncio.wait_for(
                pipeline.router.dead_letter("detect", _event(9), "internal", "bug", 0), 0.5
            )

        with pytest.raises(TimeoutError):
            asyncio.run(third())
        assert len(dlq.sent) == 7  # the record in hand was not dead-lettered
        assert "2 records in a row" in pipeline.health.down[GUARD_NAME]
    finally:
        pipeline.close()
