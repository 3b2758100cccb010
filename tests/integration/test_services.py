"""Smoke tests against the real broker and S3 store from scripts/services."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError


def _error_code(exc: ClientError) -> tuple[str, int]:
    return (
        exc.response.get("Error", {}).get("Code", ""),
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
    )


def test_kafka_produce_consume_roundtrip(services, kafka_admin) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = kafka_admin.create_topic()
    key, value = b"k-" + uuid.uuid4().bytes, b"hello from synthwatch"

    async def roundtrip():
        producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap, acks="all")
        await producer.start()
        try:
            meta = await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=services.bootstrap,
            group_id=f"g-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            msg = await asyncio.wait_for(consumer.getone(), timeout=30)
            await consumer.commit()
        finally:
            await consumer.stop()
        return meta, msg

    meta, msg = asyncio.run(roundtrip())
    assert (msg.topic, msg.partition, msg.offset) == (topic, meta.partition, meta.offset)
    assert (msg.key, msg.value) == (key, value)


def test_kafka_auto_topic_creation_is_off(services) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

    topic = f"missing-{uuid.uuid4().hex[:8]}"

    async def send_then_list() -> set[str]:
        producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap, request_timeout_ms=3000)
        await producer.start()
        try:
            with pytest.raises((KafkaTimeoutError, UnknownTopicOrPartitionError)):
                await producer.send_and_wait(topic, b"x")
        finally:
            await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=services.bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    assert topic not in asyncio.run(send_then_list())


def test_s3_put_get_and_conditional_writes(services, s3_client) -> None:
    bucket, key = services.bucket, f"tests/{uuid.uuid4().hex}"
    first = s3_client.put_object(Bucket=bucket, Key=key, Body=b"first")
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"

    # Create-only write on a fresh key succeeds ...
    fresh = f"{key}-fresh"
    s3_client.put_object(Bucket=bucket, Key=fresh, Body=b"x", IfNoneMatch="*")
    # ... and on an existing key is refused; the stored object is untouched.
    # The evidence store relies on this (SeaweedFS 4.48: honoured, 412).
    with pytest.raises(ClientError) as refused:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert _error_code(refused.value) == ("PreconditionFailed", 412)
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"

    # Compare-and-swap with If-Match: wrong ETag refused, current ETag accepted.
    with pytest.raises(ClientError) as mismatched:
        s3_client.put_object(
            Bucket=bucket, Key=key, Body=b"second", IfMatch='"0123456789abcdef0123456789abcdef"'
        )
    assert _error_code(mismatched.value) == ("PreconditionFailed", 412)
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"second", IfMatch=first["ETag"])
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"second"

    s3_client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key}, {"Key": fresh}]})


def test_s3_if_none_match_has_one_winner_under_contention(services, s3_client) -> None:
    bucket, key = services.bucket, f"tests/race-{uuid.uuid4().hex}"

    def attempt(i: int) -> str:
        try:
            s3_client.put_object(Bucket=bucket, Key=key, Body=b"w%d" % i, IfNoneMatch="*")
            return "ok"
        except ClientError as exc:
            return _error_code(exc)[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count("ok") == 1, results
    assert set(results) <= {"ok", "PreconditionFailed"}, results
    s3_client.delete_object(Bucket=bucket, Key=key)


def test_s3_store_refuses_media_that_does_not_match_its_sha256(services, s3_client, tmp_path):
    """A fetched file is stored under its sha256; the store itself must refuse bytes that
    differ from that digest, so an evidence bundle never points at other media. Through
    the pipeline's own client, which does not sign bodies and relies on this check."""
    import hashlib

    from synthwatch.errors import StorageFailed
    from synthwatch.operators.store import S3Settings, S3Store
    from synthwatch.operators.store import s3_client as pipeline_s3_client

    settings = S3Settings(
        endpoint_url=services.s3_endpoint,
        bucket=services.bucket,
        access_key_id=services.access_key,
        secret_access_key=services.secret_key,
    )
    store = S3Store(pipeline_s3_client(settings), services.bucket)
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"\x00\x00\x00\x18ftypmp42" + uuid.uuid4().bytes * 1000)
    digest = hashlib.sha256(media.read_bytes()).hexdigest()
    other = hashlib.sha256(b"other media").hexdigest()

    bad_key, good_key = f"tests/{other}", f"tests/{digest}"
    with pytest.raises(StorageFailed, match="do not match sha256"):
        store.put_file_if_absent(bad_key, media, content_type="video/mp4", sha256=other)
    assert not store.exists(bad_key)

    assert store.put_file_if_absent(good_key, media, content_type="video/mp4", sha256=digest)
    assert store.get_bytes(good_key) == media.read_bytes()
    s3_client.delete_object(Bucket=services.bucket, Key=good_key)
