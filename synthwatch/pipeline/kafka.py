"""Kafka plumbing outside the faust app: topic creation and producing refs.

Connection settings (SASL, TLS) come from `KafkaSettings`, in one place for aiokafka
clients and for faust.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from synthwatch.operators.errors import SynthwatchError
from synthwatch.pipeline.settings import KafkaSettings, Settings
from synthwatch.schemas import MediaRef, encode


class BrokerUnavailable(SynthwatchError):
    """The Kafka broker could not be reached or refused the request."""

    reason = "broker"
    permanent = False


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
    return [k.topic_refs, k.topic_fetched, k.topic_verdicts, k.topic_alerts, k.topic_dlq]


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
        for name in topic_names(k):
            if name in existing:
                result[name] = False
                continue
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=k.partitions,
                            replication_factor=k.replication_factor,
                        )
                    ]
                )
                result[name] = True
            except TopicAlreadyExistsError:
                result[name] = False
        return result
    finally:
        await admin.close()


async def produce_refs(settings: Settings, refs: Sequence[MediaRef]) -> None:
    """Send refs keyed by media id and wait until the broker has them all."""
    k = settings.kafka
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **client_kwargs(k))
    try:
        await producer.start()
    except KafkaError as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from None
    try:
        futures = [
            await producer.send(k.topic_refs, value=encode(ref), key=ref.id.encode())
            for ref in refs
        ]
        for fut in futures:
            await fut
    finally:
        await producer.stop()
