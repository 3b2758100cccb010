"""The worker's consumer never commits past a record still being processed (records of
one partition finish out of order when a stage runs several actors)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from faust.types import TP
from faust.types.tuples import Message

from synthwatch.pipeline.offsets import App, Consumer

TOPIC = "media.fetched"
TP0 = TP(TOPIC, 0)


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = App("offsets-test", broker="kafka://127.0.0.1:9", autodiscover=False)
        app.topics._acking_topics.add(TOPIC)  # what subscribing to the topic does
        c = app.consumer
        assert isinstance(c, Consumer)
        yield c
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _take(consumer: Consumer, *offsets: int, partition: int = 0) -> list[Message]:
    """Records a stream handed to its actors (tracked, not yet acknowledged)."""
    msgs = [
        Message(TOPIC, partition, o, 0.0, 0, [], b"k", b"v", None, generation_id=0) for o in offsets
    ]
    for m in msgs:
        consumer.track_message(m)
    return msgs


def test_a_record_in_flight_holds_back_the_commit_of_later_ones(consumer: Consumer) -> None:
    first, second, _third = _take(consumer, 0, 1, 2)
    consumer.ack(second)
    # Nothing committed yet: stock faust commits 2 here, past offset 0.
    assert consumer._new_offset(TP0) is None
    consumer.ack(first)
    # 0 and 1 done, 2 still in flight: commit up to 2 (the next offset to read).
    assert consumer._new_offset(TP0) == 2


def test_the_record_right_after_the_committed_offset_is_not_skipped(
    consumer: Consumer,
) -> None:
    consumer._committed_offset[TP0] = 5
    slow, fast, faster = _take(consumer, 5, 6, 7)
    consumer.ack(fast)
    consumer.ack(faster)
    # Stock faust: 6 - 5 is not "a gap wider than one", so it commits 8, past 5.
    assert consumer._new_offset(TP0) is None
    consumer.ack(slow)
    assert consumer._new_offset(TP0) == 8


def test_acknowledged_offsets_held_back_are_kept_for_the_next_commit(
    consumer: Consumer,
) -> None:
    a, b, c, d = _take(consumer, 0, 1, 2, 3)
    for m in (a, c, d):
        consumer.ack(m)
    assert consumer._new_offset(TP0) == 1  # 0 done, 1 in flight
    consumer._committed_offset[TP0] = 1
    consumer.ack(b)
    assert consumer._new_offset(TP0) == 4  # 2 and 3 were not forgotten


def test_another_partition_in_flight_does_not_hold_this_one(consumer: Consumer) -> None:
    _take(consumer, 0, partition=1)
    (m,) = _take(consumer, 0)
    consumer.ack(m)
    assert consumer._new_offset(TP0) == 1
