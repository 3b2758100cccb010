"""The streaming topology: one faust app, the whole data flow in this file.

    media.refs      MediaRef        --[fetch]-->   media.fetched   FetchedMedia
                                                   (blob written to S3 under its sha256)
    media.fetched   FetchedMedia    --[detect]-->  media.verdicts  Verdict
                                                   (sample, faces, batched inference, fuse, policy)
    media.verdicts  Verdict         --[decide]-->  media.alerts    Alert
                                                   (evidence bundle written to S3 first)
    any stage       failure         ---------->    media.dlq       DeadLetter(reason, stage)

Delivery is at-least-once: an agent awaits the broker's acknowledgement of its output
(and S3's of its objects) before it takes the next record, and faust commits only
offsets of records whose processing finished. Effects are idempotent (write-once keys,
deterministic alert ids), so a redelivery after a crash is harmless. Blocking work
(downloads, decoding, inference, S3) runs in a thread pool, never on the event loop, so
a slow batch cannot cost the consumer its group membership.

Records are read as raw bytes and decoded here, so a poison record (bad JSON, wrong
schema, null value) becomes a DLQ record instead of a crashed agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import faust
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from synthwatch.models.registry import ModelStore
from synthwatch.operators.errors import StorageFailed, SynthwatchError, is_permanent
from synthwatch.operators.evidence import EvidenceFrame
from synthwatch.operators.fetch import Fetcher
from synthwatch.operators.store import S3Store, blob_key
from synthwatch.pipeline import metrics
from synthwatch.pipeline.engine import Engine, Item, build_policy, decide
from synthwatch.pipeline.explain import Explainer, evidence_frames
from synthwatch.pipeline.kafka import client_kwargs
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import (
    DeadLetter,
    FetchedMedia,
    MediaRef,
    Verdict,
    decode,
    encode,
)

Role = Literal["fetch", "detect", "decide", "all"]
Stage = Literal["fetch", "detect", "decide"]
T = TypeVar("T")

log = structlog.get_logger("synthwatch.topology")

TRANSIENT_ATTEMPTS = 3
TRANSIENT_BACKOFF_S = 0.5


def s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    s3 = settings.s3
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
        aws_secret_access_key=(
            s3.secret_access_key.get_secret_value() if s3.secret_access_key else None
        ),
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}
        ),
    )


class Pipeline:
    """The faust app and the resources its agents share, built for one role."""

    def __init__(self, settings: Settings, role: Role) -> None:
        self.settings = settings
        self.role = role
        k = settings.kafka
        kw = client_kwargs(k)
        self.app = faust.App(
            k.app_id,
            broker=f"kafka://{k.bootstrap_servers}",
            broker_credentials=_faust_credentials(kw),
            store="memory://",
            autodiscover=False,
            topic_allow_declare=False,
            topic_disable_leader=True,  # no leader-only features used; saves a topic
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            broker_commit_every=1,
            broker_commit_interval=1.0,
            web_enabled=True,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            web_host=settings.web_host,
            stream_wait_empty=True,
        )
        self.refs = self._raw_topic(k.topic_refs)
        self.fetched = self._raw_topic(k.topic_fetched)
        self.verdicts = self._raw_topic(k.topic_verdicts)
        self.alerts = self._raw_topic(k.topic_alerts)
        self.dlq = self._raw_topic(k.topic_dlq)
        self.pool = ThreadPoolExecutor(
            max_workers=max(2, k.detect_concurrency), thread_name_prefix="sw-work"
        )
        self.store = S3Store(s3_client(settings), settings.s3.bucket)
        self.work_dir = Path(tempfile.mkdtemp(prefix="synthwatch-work-", dir=settings.work_dir))
        self.policy = build_policy(settings)
        self.engine: Engine | None = None
        self.explainer: Explainer | None = None
        self.fetcher: Fetcher | None = None
        self._wire()

    def _raw_topic(self, name: str) -> Any:
        # Raw bytes in and out: decoding is ours, so a poison record is routed, not fatal.
        return self.app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    # -- the flow -----------------------------------------------------------------

    def _wire(self) -> None:
        app, k, role = self.app, self.settings.kafka, self.role
        if role in ("fetch", "all"):
            self.fetcher = Fetcher(self.settings.fetch, embedded=False, s3_client=self.store.client)
            app.agent(self.refs, name="fetch")(self._stage("fetch", self._fetch))
        if role in ("detect", "all"):
            self.engine = Engine(self.settings)
            app.agent(self.fetched, name="detect", concurrency=k.detect_concurrency)(
                self._stage("detect", self._detect)
            )
        if role in ("decide", "all"):
            # decide loads no detector at start: policy, the blob and the verdict's
            # timeline; the explainer loads a torch module on the first alerting verdict.
            app.agent(self.verdicts, name="decide")(self._stage("decide", self._decide))
        # faust turns a page function into a View's `get`, called as (view, request), so
        # these must be plain functions (closures), not bound methods.
        app.page("/metrics")(_view(self._metrics))
        app.page("/health/live")(_view(self._live))
        app.page("/health/ready")(_view(self._ready))
        app.timer(interval=10.0)(self._update_lag)
        app.task(self._on_start)

    async def _on_start(self) -> None:
        await self._blocking(self.store.ensure_bucket)

    def _fetch(self, raw: bytes | None) -> tuple[Any, bytes, bytes] | None:
        # media.refs -> MediaRef -> download, hash, sniff -> blob in S3 -> FetchedMedia
        ref = decode(raw, MediaRef)
        assert self.fetcher is not None
        item_dir = Path(tempfile.mkdtemp(dir=self.work_dir))
        try:
            got = self.fetcher.fetch(ref.url, item_dir)
            structlog.contextvars.bind_contextvars(sha256=got.sha256, id=ref.id)
            key = blob_key(self.settings.s3.blob_prefix, got.sha256)
            # Popular media is submitted again and again: skip the upload when present
            # (the conditional PUT would refuse it anyway, after sending every byte).
            if not self.store.exists(key):
                self.store.put_file_if_absent(key, got.path, content_type=got.mime)
        finally:
            shutil.rmtree(item_dir, ignore_errors=True)
        out = FetchedMedia(
            id=ref.id,
            url=ref.url,
            source=ref.source,
            submitted_at=ref.submitted_at,
            sha256=got.sha256,
            size=got.size,
            mime=got.mime,
            media_type=got.media_type,
            blob=key,
        )
        return self.fetched, ref.id.encode(), encode(out)

    def _detect(self, raw: bytes | None) -> tuple[Any, bytes, bytes] | None:
        # media.fetched -> FetchedMedia -> blob from S3 -> sample, faces, infer, fuse -> Verdict
        fm = decode(raw, FetchedMedia)
        structlog.contextvars.bind_contextvars(sha256=fm.sha256, id=fm.id)
        assert self.engine is not None
        with self._local_blob(fm.blob, fm.sha256) as path:
            analysis = self.engine.analyze(
                Item(
                    id=fm.id,
                    url=fm.url,
                    source=fm.source,
                    submitted_at=fm.submitted_at,
                    sha256=fm.sha256,
                    media_type=fm.media_type,
                    path=path,
                    blob=fm.blob,
                    mime=fm.mime,
                )
            )
        metrics.ITEMS.labels("detect", analysis.verdict.decision).inc()
        log.info(
            "verdict",
            decision=analysis.verdict.decision,
            synthetic_score=analysis.verdict.synthetic_score,
        )
        return self.verdicts, fm.id.encode(), encode(analysis.verdict)

    def _explainer(self) -> Explainer:
        if self.engine is not None:
            return self.engine.explainer
        if self.explainer is None:
            self.explainer = Explainer(self.settings, ModelStore(self.settings.model_dir))
        return self.explainer

    def _decide(self, raw: bytes | None) -> tuple[Any, bytes, bytes] | None:
        # media.verdicts -> Verdict -> (alerting decision) evidence to S3 -> Alert
        verdict = decode(raw, Verdict)
        structlog.contextvars.bind_contextvars(sha256=verdict.sha256, id=verdict.id)
        if not self.policy.alerts(verdict.decision):
            return None

        def frames() -> list[EvidenceFrame]:
            with self._local_blob(verdict.blob, verdict.sha256) as path:
                return evidence_frames(verdict, path, self._explainer())

        decided = decide(
            verdict,
            frames,
            self.store,
            evidence_prefix=self.settings.s3.evidence_prefix,
            policy=self.policy,
        )
        if decided is None:
            return None
        alert, bundle = decided
        log.info(
            "alert",
            alert_id=alert.alert_id,
            evidence=bundle.manifest_key,
            evidence_created=bundle.created,
        )
        return self.alerts, alert.alert_id.encode(), encode(alert)

    # -- plumbing shared by every stage ---------------------------------------------

    def _local_blob(self, key: str, sha256: str) -> _BlobFile:
        return _BlobFile(self.store, key, self.work_dir / f"{sha256}-{time.monotonic_ns()}")

    def _stage(
        self, stage: Stage, work: Callable[[bytes | None], tuple[Any, bytes, bytes] | None]
    ) -> Callable[[Any], Awaitable[None]]:
        async def agent(stream: Any) -> None:
            async for event in stream.events():
                msg = event.message
                structlog.contextvars.bind_contextvars(
                    stage=stage, topic=msg.topic, partition=msg.partition, offset=msg.offset
                )
                t0 = time.perf_counter()
                try:
                    result = await self._with_retries(stage, work, event.value)
                    if result is not None:
                        topic, key, value = result
                        await (await topic.send(key=key, value=value))
                    metrics.ITEMS.labels(stage, "ok").inc()
                except SynthwatchError as exc:
                    await self._dead_letter(stage, event, exc.reason, str(exc))
                except Exception as exc:  # a bug must not wedge the partition: route it
                    log.exception("unexpected error", error_type=type(exc).__name__)
                    await self._dead_letter(stage, event, "internal", type(exc).__name__)
                finally:
                    metrics.STAGE_SECONDS.labels(stage).observe(time.perf_counter() - t0)
                    structlog.contextvars.clear_contextvars()

        agent.__name__ = f"{stage}_agent"
        return agent

    async def _with_retries(
        self, stage: Stage, work: Callable[[bytes | None], T], value: bytes | None
    ) -> T:
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                return await self._blocking(work, value)
            except SynthwatchError as exc:
                if is_permanent(exc) or attempt == TRANSIENT_ATTEMPTS:
                    raise
                log.warning("transient failure, retrying", reason=exc.reason, attempt=attempt)
                await asyncio.sleep(TRANSIENT_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        # run_in_executor does not carry contextvars over: copy them, so the worker
        # thread's log lines keep the record's topic, partition and offset.
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(ctx.run, fn, *args)
        )

    async def _dead_letter(self, stage: Stage, event: Any, reason: str, error: str) -> None:
        msg = event.message
        value = event.value
        original = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else ""
        key = (
            event.key.decode("utf-8", "backslashreplace") if isinstance(event.key, bytes) else None
        )
        record = DeadLetter(
            reason=reason,
            stage=stage,
            error=error[:2000],
            id=key,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            original=original[:100_000],
            failed_at=time.time(),
        )
        log.warning("dead-lettered", reason=reason, error=error[:300])
        metrics.DLQ.labels(stage, reason).inc()
        metrics.ITEMS.labels(stage, "dlq").inc()
        await (await self.dlq.send(key=(key or "").encode(), value=encode(record)))

    # -- web views and timers -----------------------------------------------------

    def _metrics(self, view: Any) -> Any:
        return view.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    def _live(self, view: Any) -> Any:
        return view.json({"live": True})

    def _ready(self, view: Any) -> Any:
        assigned = len(self.app.consumer.assignment())
        ready = assigned > 0
        return view.json({"ready": ready, "partitions": assigned}, status=200 if ready else 503)

    async def _update_lag(self) -> None:
        consumer = self.app.consumer
        for tp in consumer.assignment():
            # faust keeps the committed offsets in a private map and offers no accessor.
            committed = getattr(consumer, "_committed_offset", {}).get(tp)
            position = committed if committed is not None else await consumer.position(tp)
            if position is None:
                continue
            lag = max(0, consumer.highwater(tp) - position)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.fetcher is not None:
            self.fetcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _view(handler: Callable[[Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def page(view: Any, request: Any) -> Any:
        return handler(view)

    return page


class _BlobFile:
    """Download a blob to a local file for the duration of a `with` block."""

    def __init__(self, store: S3Store, key: str, path: Path) -> None:
        self.store, self.key, self.path = store, key, path

    def __enter__(self) -> Path:
        try:
            self.store.download(self.key, self.path)
        except StorageFailed:
            self.path.unlink(missing_ok=True)
            raise
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _faust_credentials(kw: dict[str, Any]) -> Any:
    if "sasl_mechanism" not in kw:
        return faust.SSLCredentials(kw["ssl_context"]) if "ssl_context" in kw else None
    return faust.SASLCredentials(
        username=kw["sasl_plain_username"],
        password=kw["sasl_plain_password"],
        mechanism=kw["sasl_mechanism"],
        ssl_context=kw.get("ssl_context"),
    )


def build(settings: Settings, role: Role) -> Pipeline:
    return Pipeline(settings, role)


def run_worker(settings: Settings, role: Role) -> None:
    """Run until SIGTERM/SIGINT; faust stops agents, commits and leaves the group."""
    pipeline = build(settings, role)
    try:
        worker = faust.Worker(
            pipeline.app, loglevel=settings.log_level, quiet=True, override_logging=False
        )
        worker.execute_from_commandline()
    finally:
        pipeline.close()
