"""Where a record goes when its stage is done with it: sends, retries and the DLQ.

- `send`: one record, acknowledged by the broker; a failed send is the broker's outage,
  not the record's, so the record is kept and sent again until the broker takes it.
- `with_retries`: a stage's work with a few quick attempts in place for a transient
  failure (`RetrySettings.inline_*`).
- `retry_later` / `retry_agent`: a transient failure that in-place attempts did not cure
  goes round `media.retry`, held there until due, then back to its stage's topic with an
  attempt header; after `topic_attempts` rounds, to the DLQ.
- `dead_letter`: a permanent failure, or an exhausted transient one, to `media.dlq` with
  its reason, stage, error and the original record.
- `DlqLimit`: a guard on the DLQ itself. A bad deploy (a bug that fails every record, a
  model that will not load, a wrong sink token) would otherwise drain whole partitions
  into the DLQ at the speed of the consumer. Past the limit the stage stops taking
  records: the record in hand is neither dead-lettered nor committed, readiness turns
  false and liveness fails, so the orchestrator restarts the worker and an operator
  rolls the deploy back. After Arroyo's `DlqLimit` (getsentry/arroyo, `arroyo.dlq`): a
  consecutive count and a ratio over recent records. Only failures that blame our side
  (`GUARDED_REASONS`) count: a feed of broken links or corrupt files is what the DLQ is
  for, and must never stop a stage.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import structlog
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from synthwatch.errors import SchemaInvalid, SynthwatchError, TooLarge, is_permanent
from synthwatch.operators.backoff import backoff
from synthwatch.pipeline import metrics, tracing
from synthwatch.pipeline.health import Health
from synthwatch.pipeline.settings import RetrySettings
from synthwatch.schemas import DeadLetter, decode, encode

Stage = Literal["fetch", "detect", "decide", "sink"]
LetterStage = Literal["fetch", "detect", "decide", "sink", "retry"]
"""Where a record failed: a stage, or the retry agent (a retry record it cannot read)."""
T = TypeVar("T")

log = structlog.get_logger("synthwatch.routing")

ATTEMPT_HEADER = "synthwatch-attempt"
"""Header on a record re-sent to its stage's topic from the retry topic: how many
retry-topic attempts it has had."""
ORIGINAL_MAX_CHARS = 900_000
"""Cap on the consumed record kept in a retry or DLQ record (Kafka's default message
limit is 1 MB); pipeline records are far smaller, so a replay gets them whole."""
GUARDED_REASONS = frozenset({"internal", "model_unavailable", "config", "schema", "delivery"})
"""Dead-letter reasons that point at a deploy rather than at the record: a bug (an
unexpected exception), models or settings the worker cannot use, records an upstream
stage wrote wrongly, a sink endpoint refusing every alert."""
GUARD_NAME = "dlq_guard"
"""The name the tripped DLQ guard goes by in readiness (`/health/ready`'s `down`)."""


@dataclass
class DlqLimit:
    """Trips when a stage dead-letters `max_consecutive` records in a row for a reason in
    `GUARDED_REASONS`, or more than `max_ratio` of its last `window` records (0 turns
    either check off). Every other outcome (sent on, retried, dead-lettered for the
    record's own fault) counts as a good record."""

    max_consecutive: int = 0
    max_ratio: float = 0.0
    window: int = 200

    def __post_init__(self) -> None:
        self._consecutive: dict[str, int] = {}
        self._recent: dict[str, deque[bool]] = {}

    def record(self, stage: str, *, guarded: bool) -> None:
        """Count one record of `stage`: `guarded` when it was dead-lettered for a reason
        in `GUARDED_REASONS`."""
        self._consecutive[stage] = self._consecutive.get(stage, 0) + 1 if guarded else 0
        recent = self._recent.setdefault(stage, deque(maxlen=max(1, self.window)))
        recent.append(guarded)

    def exceeded(self, stage: str) -> str | None:
        """Why one more dead letter from `stage` is refused; None while under the limit."""
        run = self._consecutive.get(stage, 0)
        if self.max_consecutive and run >= self.max_consecutive:
            return f"{run} records in a row dead-lettered as ours (limit {self.max_consecutive})"
        recent = self._recent.get(stage, deque())
        if self.max_ratio and len(recent) >= self.window:
            share = sum(recent) / len(recent)
            if share > self.max_ratio:
                return (
                    f"{share:.0%} of the last {len(recent)} records dead-lettered as ours "
                    f"(limit {self.max_ratio:.0%})"
                )
        return None


class Router:
    """Sends, retries and dead letters for every stage of one worker."""

    def __init__(
        self,
        settings: RetrySettings,
        *,
        retry: Any,
        dlq: Any,
        stage_topics: dict[str, Any],
        health: Health,
        blocking: Callable[..., Awaitable[Any]],
    ) -> None:
        self.settings = settings
        self.retry = retry
        self.dlq = dlq
        self.stage_topics = stage_topics
        self.health = health
        self._blocking = blocking
        self.limit = DlqLimit(
            max_consecutive=settings.dlq_limit_consecutive,
            max_ratio=settings.dlq_limit_ratio,
            window=settings.dlq_limit_window,
        )

    async def send(self, topic: Any, key: bytes | None, value: bytes, headers: Any) -> None:
        """Send one record and wait until the broker has it.

        A failed send is the broker's trouble, not the record's: the record is kept and
        sent again, with backoff, until the broker takes it (readiness false meanwhile;
        waiting on a dependency is not a stall). Routing it to the DLQ instead would
        blame the record, and the DLQ is on the same broker; letting the exception out
        would crash the agent, and faust acknowledges the record an agent crashed on, so
        it would be lost. Only a record the broker refuses for its size raises
        (`TooLarge`, permanent).
        """
        attempt = 0
        while True:
            try:
                await (await topic.send(key=key, value=value, headers=headers))
            except (KafkaError, ProducerSendError) as exc:
                cause = exc.__cause__ if isinstance(exc, ProducerSendError) else exc
                if isinstance(cause, MessageSizeTooLargeError):
                    raise TooLarge(
                        f"the broker refused a {len(value)}-byte record for its size"
                    ) from exc
                attempt += 1
                error = f"{type(cause or exc).__name__}: {cause or exc}"
                self.health.mark_down("kafka", error)
                log.error(
                    "send failed: the record is kept and sent again",
                    topic=topic.get_topic_name(),
                    error=error[:300],
                    attempt=attempt,
                )
                self.health.watchdog.beat()
                await asyncio.sleep(backoff(attempt, 1.0, self.settings.outage_backoff_max_s) + 0.5)
                continue
            if attempt:
                log.warning("the broker took the record", attempts=attempt + 1)
            return

    def sent_on(self, stage: Stage) -> None:
        """A record of `stage` finished without a dead letter."""
        self.limit.record(stage, guarded=False)

    async def with_retries(self, work: Callable[[bytes | None], T], value: bytes | None) -> T:
        """`work(value)` in the worker pool, attempted again in place after a transient
        failure, up to `inline_attempts` in all."""
        r = self.settings
        for attempt in range(1, r.inline_attempts + 1):
            try:
                result: T = await self._blocking(work, value)
                return result
            except SynthwatchError as exc:
                if is_permanent(exc) or attempt == r.inline_attempts:
                    raise
                delay = backoff(attempt, r.inline_backoff_s, r.inline_backoff_max_s)
                log.warning(
                    "transient failure, retrying in place",
                    reason=exc.reason,
                    error=str(exc)[:300],
                    attempt=attempt,
                    delay_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def retry_later(
        self, stage: Stage, event: Any, exc: SynthwatchError, attempt: int
    ) -> None:
        """A transient failure that in-place retries did not cure: the retry topic, or
        the DLQ once the record has had `retry.topic_attempts` trips through it."""
        if attempt >= self.settings.topic_attempts:
            error = f"gave up after {attempt + 1} rounds of attempts: {exc}"
            await self.dead_letter(stage, event, exc.reason, error, attempt)
            return
        self.limit.record(stage, guarded=False)
        record = letter(stage, event, exc.reason, str(exc), attempt + 1)
        log.warning("transient failure: to the retry topic", reason=exc.reason, next=attempt + 1)
        metrics.RETRIED.labels(stage, exc.reason).inc()
        metrics.ITEMS.labels(stage, "retry").inc()
        await self.send(
            self.retry, (record.id or "").encode(), encode(record), trace_headers(event)
        )

    async def retry_agent(self, stream: Any) -> None:
        """Hold each retry record until it is due, then send its original back to the
        stage's input topic with the attempt count in a header.

        Records arrive roughly in due order (the delay grows with the attempt, not with
        the record), so waiting on the head of a partition delays little else.
        """
        r = self.settings
        watchdog = self.health.watchdog
        async for event in stream.events():
            watchdog.started()
            try:
                held = decode(event.value, DeadLetter)
                target = self.stage_topics.get(held.stage)
                if target is None:
                    raise SchemaInvalid(f"retry record for unknown stage {held.stage!r}")
                rng = random.Random(f"{held.id}:{held.attempt}")  # same delay on redelivery
                due = held.failed_at + backoff(
                    held.attempt, r.topic_backoff_s, r.topic_backoff_max_s, rng
                )
                while (wait := due - time.time()) > 0:
                    watchdog.beat()
                    await asyncio.sleep(min(wait, 5.0))
                await self.send(
                    target,
                    event.key,
                    held.original.encode(),
                    [(ATTEMPT_HEADER, str(held.attempt).encode()), *trace_headers(event)],
                )
            except SynthwatchError as exc:  # a bad retry record, or one the broker refuses
                await self.dead_letter("retry", event, exc.reason, str(exc), 0)
            finally:
                watchdog.finished()

    async def dead_letter(
        self, stage: LetterStage, event: Any, reason: str, error: str, attempt: int
    ) -> None:
        """`event` to the DLQ, unless the reason blames our side and the stage is over
        its `DlqLimit`: then the stage stops here (see the module docstring) and this
        never returns."""
        guarded = reason in GUARDED_REASONS
        why = self.limit.exceeded(stage) if guarded else None
        if why is not None:
            await self._halt(stage, why)
        self.limit.record(stage, guarded=guarded)
        record = letter(stage, event, reason, error, attempt)
        log.warning("dead-lettered", reason=reason, error=error[:300])
        metrics.DLQ.labels(stage, reason).inc()
        metrics.ITEMS.labels(stage, "dlq").inc()
        key, headers = (record.id or "").encode(), trace_headers(event)
        try:
            await self.send(self.dlq, key, encode(record), headers)
        except TooLarge:
            # The original kept verbatim is what made it too large: send the record
            # without it (topic, partition and offset still say where it is).
            log.error("DLQ record too large for the broker: sent without the original")
            await self.send(
                self.dlq, key, encode(msgspec.structs.replace(record, original="")), headers
            )

    async def _halt(self, stage: str, why: str) -> None:
        """Stop the stage with the record in hand: not ready, and no progress, so the
        watchdog fails liveness after `health.stall_s` and the worker is restarted. The
        record is not committed (it is in flight), so it is read again after the fix."""
        self.health.stop_serving(GUARD_NAME, f"{stage}: {why}")
        metrics.DLQ_GUARD_TRIPPED.labels(stage).set(1)
        log.critical(
            "DLQ guard tripped: the stage stops rather than drain its partitions into the DLQ",
            stage=stage,
            why=why,
        )
        while True:
            await asyncio.sleep(3600)


def letter(stage: LetterStage, event: Any, reason: str, error: str, attempt: int) -> DeadLetter:
    """The retry or DLQ record for a consumed `event`."""
    msg = event.message
    value = event.value
    original = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else ""
    key = event.key.decode("utf-8", "backslashreplace") if isinstance(event.key, bytes) else None
    return DeadLetter(
        reason=reason,
        stage=stage,
        error=error[:2000],
        attempt=attempt,
        id=key,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        original=original[:ORIGINAL_MAX_CHARS],
        failed_at=time.time(),
    )


def attempt_of(message: Any) -> int:
    """Retry-topic attempts a consumed record has had (0 for a first delivery)."""
    headers = getattr(message, "headers", None) or ()
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        if name == ATTEMPT_HEADER:
            try:
                return max(0, int(bytes(value).decode("ascii")))
            except (TypeError, ValueError, UnicodeDecodeError):
                return 0
    return 0


def trace_headers(event: Any) -> tracing.Headers:
    """Trace context for a record produced about `event`: the current span's (a stage
    routing its record), else the consumed record's own (the retry agent passing it on)."""
    return tracing.current_headers() or tracing.trace_headers(
        getattr(event.message, "headers", None)
    )
