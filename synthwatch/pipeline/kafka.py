"""Kafka plumbing outside the faust app: topic creation, producing refs, DLQ replay.

Connection settings (SASL, TLS) come from `KafkaSettings`, in one place for aiokafka
clients and for faust.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from opentelemetry.trace import SpanKind

from synthwatch.errors import BrokerUnavailable, SynthwatchError
from synthwatch.pipeline import tracing
from synthwatch.pipeline.settings import KafkaSettings, Settings
from synthwatch.schemas import DeadLetter, MediaRef, decode, encode


def client_kwargs(k: KafkaSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl.create_default_context()
    if k.sasl_mechanism:
        kwargs["sasl_mechanism"] = k.sasl_mechanism
        kwargs["sasl_plain_username"] = k.sasl_username
        kwargs["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password else None
        )
    return kwargs


def topic_names(k: KafkaSettings) -> list[str]:
    return [
        k.topic_refs,
        k.topic_fetched,
        k.topic_verdicts,
        k.topic_alerts,
        k.topic_dlq,
        k.topic_retry,
    ]


async def create_topics(settings: Settings) -> dict[str, bool]:
    """Create every pipeline topic that does not exist; name -> whether it was created."""
    k = settings.kafka
    admin = AIOKafkaAdminClient(**client_kwargs(k))
    try:
        await admin.start()
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from None
    try:
        existing = set(await admin.list_topics())
        result: dict[str, bool] = {}
        for name in [*topic_names(k), k.topic_hashlists]:
            if name in existing:
                result[name] = False
                continue
            # The lists topic keeps the latest record of every entry for ever.
            configs = {"cleanup.policy": "compact"} if name == k.topic_hashlists else None
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=k.partitions,
                            replication_factor=k.replication_factor,
                            topic_configs=configs,
                        )
                    ]
                )
                result[name] = True
            except TopicAlreadyExistsError:
                result[name] = False
        return result
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def started_producer(k: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    """An idempotent producer that waits for every in-sync replica, started, and stopped
    on exit; BrokerUnavailable when the broker cannot be reached."""
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_kwargs(k))
    try:
        await producer.start()
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from None
    try:
        yield producer
    finally:
        await producer.stop()


async def produce_refs(settings: Settings, refs: Sequence[MediaRef]) -> None:
    """Send refs keyed by media id and wait until the broker has them all."""
    k = settings.kafka
    async with started_producer(k) as producer:
        futures = []
        for ref in refs:
            # Each reference starts its own trace; the stages continue it (tracing.py).
            with tracing.span(
                "synthwatch.submit",
                kind=SpanKind.PRODUCER,
                attributes={"messaging.system": "kafka", "synthwatch.id": ref.id},
            ):
                futures.append(
                    await producer.send(
                        k.topic_refs,
                        value=encode(ref),
                        key=ref.id.encode(),
                        headers=tracing.current_headers(),
                    )
                )
        for fut in futures:
            await fut


REPLAY_HEADER = "synthwatch-replayed-from"
"""Header on a replayed record: `<dlq topic>:<partition>:<offset>` it came from."""


@dataclass(frozen=True)
class Replay:
    """One dead letter matched by `replay_dlq`, and where its original went (if sent)."""

    letter: DeadLetter
    partition: int
    offset: int
    target: str | None
    """Topic the original was (or, in a dry run, would be) sent to; None if not replayable."""
    why_not: str = ""


def stage_input_topics(k: KafkaSettings) -> dict[str, str]:
    """The topic whose records each stage consumes (and a replay sends back to)."""
    return {
        "submit": k.topic_refs,
        "fetch": k.topic_refs,
        "detect": k.topic_fetched,
        "decide": k.topic_verdicts,
        "sink": k.topic_alerts,
    }


async def replay_dlq(
    settings: Settings,
    *,
    reasons: Sequence[str] = (),
    stages: Sequence[str] = (),
    ids: Sequence[str] = (),
    since: float | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> list[Replay]:
    """Send the originals of matching dead letters back to their stage's input topic.

    Reads the DLQ from its beginning up to the end offsets found at the start (records
    dead-lettered during the replay are left for the next one), without a consumer
    group, so a filtered replay never hides the records it skipped from a later one.
    Filters combine with AND; empty means any. Replaying twice re-submits twice: the
    pipeline's effects are idempotent (write-once evidence, deterministic alert ids),
    so the cost is work, not duplicates after dedup by id.

    Raises:
        BrokerUnavailable: the broker cannot be reached.
    """
    k = settings.kafka
    targets = stage_input_topics(k)
    # Subscribed without a group: aiokafka then assigns every partition of the topic.
    consumer = AIOKafkaConsumer(
        k.topic_dlq,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        **client_kwargs(k),
    )
    producer = (
        None
        if dry_run
        else AIOKafkaProducer(acks="all", enable_idempotence=True, **client_kwargs(k))
    )
    try:
        await consumer.start()
        if producer is not None:
            await producer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerUnavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from None
    out: list[Replay] = []
    try:
        tps = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if not tps:
            return out
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        sends = []
        while pending and (limit is None or len(out) < limit):
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset >= ends[tp]:
                        pending.discard(tp)
                        break
                    if m.offset == ends[tp] - 1:
                        pending.discard(tp)
                    try:
                        letter = decode(m.value, DeadLetter)
                    except SynthwatchError:
                        continue  # not ours to replay; a DLQ holds only DeadLetters
                    if not _matches(letter, reasons, stages, ids, since):
                        continue
                    if limit is not None and len(out) >= limit:
                        break
                    target = targets.get(letter.stage)
                    why = "" if target else f"stage {letter.stage!r} has no input topic"
                    if target and not letter.original:
                        target, why = None, "no original record kept"
                    out.append(Replay(letter, tp.partition, m.offset, target, why))
                    if target and producer is not None:
                        sends.append(
                            await producer.send(
                                target,
                                value=letter.original.encode(),
                                key=(letter.id or "").encode() or None,
                                headers=[
                                    (
                                        REPLAY_HEADER,
                                        f"{k.topic_dlq}:{tp.partition}:{m.offset}".encode(),
                                    ),
                                    # the replayed record stays in its original trace
                                    *tracing.trace_headers(m.headers),
                                ],
                            )
                        )
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        for fut in sends:
            await fut
        return out
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


def _matches(
    letter: DeadLetter,
    reasons: Sequence[str],
    stages: Sequence[str],
    ids: Sequence[str],
    since: float | None,
) -> bool:
    return (
        (not reasons or letter.reason in reasons)
        and (not stages or letter.stage in stages)
        and (not ids or letter.id in ids)
        and (since is None or letter.failed_at >= since)
    )
