"""Lists of known media on Kafka: one compacted topic every detect worker reads whole.

`synthwatch hashes import|add|remove --cluster` publishes each entry as one record keyed
`<list>/<id>` (its JSON), and each removal as a tombstone (a null value) under the same
key. The topic is compacted (`cleanup.policy=compact`), so it keeps the latest record of
every key for ever: a worker that starts next year still reads every list, and a
removed entry disappears for good once compaction drops its tombstone's predecessors.

`ListFollower` reads the topic outside any consumer group (every worker needs every
entry, not a share of the partitions) from the beginning, in a thread with its own
event loop, applying records to the engine's `Matcher` as they arrive: a list update
reaches every running worker within about a poll interval, without a restart. `start`
returns once the follower has read up to the ends the topic had when it started, so a
worker never scans with half-loaded lists; it raises if that takes longer than
`matching.follow_timeout_s`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from synthwatch.errors import BrokerUnavailable
from synthwatch.operators.hashlists import Entry
from synthwatch.operators.matching import Matcher
from synthwatch.pipeline import metrics
from synthwatch.pipeline.kafka import client_kwargs, started_producer
from synthwatch.pipeline.settings import Settings

log = structlog.get_logger("synthwatch.listfeed")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)


async def _publish(settings: Settings, records: Sequence[tuple[str, bytes | None]]) -> None:
    k = settings.kafka
    async with started_producer(k) as producer:
        futures = [
            await producer.send(k.topic_hashlists, key=key.encode(), value=value)
            for key, value in records
        ]
        for fut in futures:
            await fut


def publish(settings: Settings, entries: Sequence[Entry], removed: Sequence[str] = ()) -> None:
    """Send entries (and tombstones for the `<list>/<id>` keys in `removed`) to the lists
    topic, and wait until the broker has them all."""
    records: list[tuple[str, bytes | None]] = [(e.key, _encoder.encode(e)) for e in entries]
    records.extend((key, None) for key in removed)
    asyncio.run(_publish(settings, records))


def read_all(settings: Settings, timeout_s: float = 60.0) -> list[Entry]:
    """Every entry on the lists topic now (what a worker starting now would load)."""
    entries: dict[str, Entry] = {}
    follower = ListFollower(settings, None, on_entry=lambda k, e: _collect(entries, k, e))
    follower.start(timeout_s)
    follower.close()
    return sorted(entries.values(), key=lambda e: (e.list, e.id))


def _collect(entries: dict[str, Entry], key: str, entry: Entry | None) -> None:
    if entry is None:
        entries.pop(key, None)
    else:
        entries[key] = entry


class ListFollower:
    """Apply the lists topic to a `Matcher`, from its beginning and then as it grows."""

    def __init__(
        self,
        settings: Settings,
        matcher: Matcher | None,
        *,
        on_entry: Callable[[str, Entry | None], None] | None = None,
    ) -> None:
        self._settings = settings
        self._matcher = matcher
        self._on_entry = on_entry
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="list-follower", daemon=True
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up = threading.Event()
        self.applied = 0
        """Records applied so far (entries and tombstones)."""

    def start(self, timeout_s: float | None = None) -> None:
        """Connect and read the topic to its current end. Raises BrokerUnavailable when
        the broker or the topic cannot be read within the timeout."""
        timeout = self._settings.matching.follow_timeout_s if timeout_s is None else timeout_s
        self._thread.start()
        k = self._settings.kafka
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
            if not self._caught_up.wait(timeout):
                raise TimeoutError("the lists topic was not read to its end in time")
        except BaseException as exc:
            self.close()
            raise BrokerUnavailable(
                f"cannot read the lists of known media from {k.topic_hashlists!r} at "
                f"{k.bootstrap_servers}: {type(exc).__name__} {exc} (create it with "
                "`synthwatch topics create`; or set SYNTHWATCH_MATCHING__LISTS=local or off)"
            ) from None
        if self._matcher is not None:  # a worker's start, not a command's read
            log.info(
                "lists of known media loaded", entries=len(self._matcher), records=self.applied
            )

    async def _start(self) -> None:
        k = self._settings.kafka
        consumer = AIOKafkaConsumer(
            k.topic_hashlists,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **client_kwargs(k),
        )
        await consumer.start()
        self._consumer = consumer
        # Without a group, every partition of the topic is assigned at start.
        tps = sorted(consumer.assignment())
        if not tps:
            raise LookupError(f"no topic {k.topic_hashlists!r}")
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        if self._matcher is not None:
            metrics.HASHLIST_ENTRIES.labels("kafka").set(len(self._matcher))
        self._task = self._loop.create_task(self._follow(consumer, ends))

    async def _follow(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        pending = {tp: end for tp, end in ends.items() if end > 0}
        if not pending:
            self._caught_up.set()
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            except KafkaError as exc:
                log.warning("lists topic unreadable: retrying", error=str(exc)[:200])
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                self._apply(records)
                if tp in pending and records[-1].offset + 1 >= pending[tp]:
                    del pending[tp]
            if not self._caught_up.is_set() and not pending:
                self._caught_up.set()

    def _apply(self, records: Sequence[object]) -> None:
        puts: list[Entry] = []
        for record in records:
            key = bytes(getattr(record, "key", b"") or b"").decode(errors="replace")
            value = getattr(record, "value", None)
            if value is None:
                self._put(puts)
                puts = []
                if self._matcher is not None:
                    self._matcher.remove([key])
                self._notify(key, None)
            else:
                try:
                    entry = _decoder.decode(value)
                except msgspec.MsgspecError as exc:
                    # One bad record must not stop every worker: it is skipped, loudly.
                    log.error("list record skipped", key=key, error=str(exc)[:200])
                    continue
                puts.append(entry)
                self._notify(entry.key, entry)
            self.applied += 1
        self._put(puts)
        if self._matcher is not None:
            metrics.HASHLIST_ENTRIES.labels("kafka").set(len(self._matcher))

    def _put(self, entries: list[Entry]) -> None:
        if entries and self._matcher is not None:
            self._matcher.put_many(entries)

    def _notify(self, key: str, entry: Entry | None) -> None:
        if self._on_entry is not None:
            self._on_entry(key, entry)

    def close(self) -> None:
        async def stop() -> None:
            if self._task is not None:
                self._task.cancel()
            if self._consumer is not None:
                await self._consumer.stop()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            except Exception as exc:
                log.warning("list follower did not stop cleanly", error=str(exc)[:200])
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
