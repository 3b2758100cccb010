"""Offset commits that never pass a record still being processed.

A stage runs several actors on one stream (`fetch_concurrency`, `detect_concurrency`),
so the records of a partition finish out of order: offset 6 can be done while offset 5
is still being decoded. faust-streaming (0.15.3, the latest release) then commits 7.
Its guard against a gap at the head of the acknowledged offsets only holds back when
the gap is wider than one record, and is skipped altogether while nothing has been
committed yet (a new group, or committed offset 0). A worker killed before offset 5
finishes comes back at 7, and offset 5's media is never scanned: no verdict, no DLQ
record. The fault suite caught it (`decide.after_alert` kill, one item of three lost).
Upstream: faust-streaming issue #606 and the unmerged pull request #707.

The fix keeps faust's own bookkeeping and only narrows what it may see: before it
picks the offset to commit for a partition, acknowledged offsets at or above the lowest
record its streams took but have not acknowledged are set aside, and put back after.
So the commit stops just below the oldest record in flight, and moves on once that
record is acknowledged. A record is "taken" from the moment a stream hands it to an
actor (faust tracks it then, before any await), so every offset below an acknowledged
one is either acknowledged or tracked as in flight.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.types.tuples import ack_lock


def in_flight_floor(consumer: Any, tp: TP) -> int | None:
    """The lowest offset of `tp` that a stream took and has not acknowledged, at or above
    the committed offset (None when there is none)."""
    committed = consumer._committed_offset[tp]
    pending = [
        m.offset
        for m in list(consumer._unacked_messages)
        if m.tp == tp and not m.acked and (committed is None or m.offset >= committed)
    ]
    return min(pending) if pending else None


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, committing no offset past a record in flight."""

    def _new_offset(self, tp: TP) -> int | None:
        with ack_lock:  # `ack` appends to the same list, possibly from another thread
            floor = in_flight_floor(self, tp)
            if floor is None:
                return super()._new_offset(tp)
            acked = self._acked[tp]
            held = [offset for offset in acked if offset >= floor]
            if not held:
                return super()._new_offset(tp)
            acked[:] = [offset for offset in acked if offset < floor]
            try:
                return super()._new_offset(tp)
            finally:
                acked.extend(held)
                acked.sort()


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """A faust app whose consumer commits only offsets below every record in flight."""

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)
