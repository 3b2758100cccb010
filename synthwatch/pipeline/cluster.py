"""The API's link to a running pipeline (`synthwatch serve` with `api.mode=cluster`).

`ClusterLink` owns a thread with its own asyncio loop, one producer and one consumer.
`submit` sends a `MediaRef` to the refs topic (as `synthwatch submit` does) and waits
until the broker has it. The consumer follows the verdict, alert and dead-letter topics
and hands each record to the callbacks; they run in a small thread pool, so a callback
that writes to S3 never stalls the loop.

The consumer has no group: every API replica reads every partition from the end of
each topic as it was when the link started, so no replica's scan outcome is consumed
by another, and `start` returns only once those positions are fixed: a verdict for a
scan submitted afterwards cannot be missed. What arrives while the server is down is
not seen; the scans that were in flight are marked interrupted at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from synthwatch.errors import BrokerUnavailable, SynthwatchError
from synthwatch.pipeline.kafka import client_kwargs
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import Alert, DeadLetter, MediaRef, Verdict, decode, encode

log = structlog.get_logger("synthwatch.api.cluster")

TICK_S = 5.0
"""How often `on_tick` runs (the service's deadlines)."""


class ClusterLink:
    """Produce refs, follow outcomes. `start()` then `close()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_verdict: Callable[[Verdict], None],
        on_alert: Callable[[Alert], None],
        on_dead_letter: Callable[[DeadLetter], None],
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._handlers: dict[str, Callable[[bytes], None]] = {
            settings.kafka.topic_verdicts: lambda raw: on_verdict(decode(raw, Verdict)),
            settings.kafka.topic_alerts: lambda raw: on_alert(decode(raw, Alert)),
            settings.kafka.topic_dlq: lambda raw: on_dead_letter(decode(raw, DeadLetter)),
        }
        self._on_tick = on_tick
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="api-cluster")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="api-outcome")
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, timeout_s: float = 60.0) -> None:
        """Connect, and fix the consumer's positions at the topics' ends. Raises
        BrokerUnavailable when the broker cannot be reached within `timeout_s`."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout_s)
        except BaseException as exc:
            self.close()
            if isinstance(exc, SynthwatchError):
                raise
            raise BrokerUnavailable(
                f"cannot reach Kafka at {self._settings.kafka.bootstrap_servers}: "
                f"{type(exc).__name__} {exc}"
            ) from None

    async def _start(self) -> None:
        kwargs = client_kwargs(self._settings.kafka)
        self._producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **kwargs)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            *self._handlers, group_id=None, auto_offset_reset="latest", **kwargs
        )
        await self._consumer.start()
        # Without a group every partition is assigned at once; asking each position
        # now pins "latest" to the end as of this moment.
        for partition in self._consumer.assignment():
            await self._consumer.position(partition)
        self._tasks = [
            self._loop.create_task(self._follow()),
            self._loop.create_task(self._tick()),
        ]

    def submit(self, ref: MediaRef, timeout_s: float = 30.0) -> None:
        """Send `ref` to the refs topic; returns once the broker has it. Raises
        BrokerUnavailable."""
        future = asyncio.run_coroutine_threadsafe(self._send(ref), self._loop)
        try:
            future.result(timeout_s)
        except SynthwatchError:
            raise
        except Exception as exc:
            future.cancel()
            raise BrokerUnavailable(
                f"the scan could not be handed to Kafka: {type(exc).__name__} {exc}"
            ) from None

    async def _send(self, ref: MediaRef) -> None:
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self._settings.kafka.topic_refs, value=encode(ref), key=ref.id.encode()
            )
        except KafkaError as exc:
            raise BrokerUnavailable(f"the scan could not be handed to Kafka: {exc}") from None

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: keep trying, say so
                log.warning("cannot read outcomes from Kafka", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                handle = self._handlers[tp.topic]
                for record in records:
                    self._pool.submit(self._handle, handle, tp.topic, record.value)

    @staticmethod
    def _handle(handle: Callable[[bytes], None], topic: str, raw: Any) -> None:
        try:
            handle(raw)
        except SynthwatchError as exc:  # another producer's record we cannot read
            log.warning("record skipped", topic=topic, reason=exc.reason, error=str(exc))
        except Exception:
            log.exception("outcome handler failed", topic=topic)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._pool.submit(self._run_tick)

    def _run_tick(self) -> None:
        try:
            self._on_tick()
        except Exception:
            log.exception("deadline check failed")

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        if not self._loop.is_running():
            self._loop.close()

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # Cancelled, or failed: stopping either way.
            with contextlib.suppress(BaseException):
                await task
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
