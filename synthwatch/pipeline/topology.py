"""The streaming topology: one faust app, the whole data flow in this file.

    media.refs      MediaRef        --[fetch]-->   media.fetched   FetchedMedia
                                                   (blob written to S3 under its sha256)
    media.fetched   FetchedMedia    --[detect]-->  media.verdicts  Verdict
                                                   (sample, faces, batched inference, fuse, policy)
    media.verdicts  Verdict         --[decide]-->  media.alerts    Alert
                                                   (evidence bundle written to S3 first)
    any stage       failure         ---------->    media.dlq       DeadLetter(reason, stage)

Delivery is at-least-once: an agent awaits the broker's acknowledgement of its output
(and S3's of its objects) before it takes the next record, and the consumer commits
only offsets below every record still in flight (`offsets`: stock faust does not when a
stage's actors finish a partition's records out of order). Effects are idempotent
(write-once keys, deterministic alert ids), so a redelivery after a crash is harmless.
Blocking work (downloads, decoding, inference, S3) runs in a thread pool, never on the
event loop, so a slow batch cannot cost the consumer its group membership.

Records are read as raw bytes and decoded here, so a poison record (bad JSON, wrong
schema, null value) becomes a DLQ record instead of a crashed agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import faust
import msgspec
import structlog
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from opentelemetry.trace import Span, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from synthwatch.models.registry import ModelStore
from synthwatch.operators.backoff import backoff
from synthwatch.operators.errors import (
    SchemaInvalid,
    StorageFailed,
    SynthwatchError,
    TooLarge,
    is_permanent,
)
from synthwatch.operators.evidence import EvidenceFrame
from synthwatch.operators.fetch import Fetcher
from synthwatch.operators.netguard import redact_url
from synthwatch.operators.store import LocalHandoff, S3Store, blob_key
from synthwatch.operators.webhook import Attempt, WebhookSink
from synthwatch.pipeline import metrics, tracing
from synthwatch.pipeline.engine import Engine, Item, build_policy, decide
from synthwatch.pipeline.explain import Explainer, evidence_frames
from synthwatch.pipeline.faults import FaultPoints
from synthwatch.pipeline.kafka import client_kwargs
from synthwatch.pipeline.offsets import App as CommitSafeApp
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import (
    Alert,
    DeadLetter,
    FetchedMedia,
    MediaRef,
    Verdict,
    decode,
    encode,
)

Role = Literal["fetch", "detect", "decide", "sink", "all"]
Stage = Literal["fetch", "detect", "decide", "sink"]
LetterStage = Literal["fetch", "detect", "decide", "sink", "retry"]
"""Where a record failed: a stage, or the retry agent (a retry record it cannot read)."""
T = TypeVar("T")

log = structlog.get_logger("synthwatch.topology")

ATTEMPT_HEADER = "synthwatch-attempt"
HANDOFF_WAIT_S = 30.0
"""--role all: how long a fetch waits for its own detect stage to make room in the local
hand-off before going ahead anyway (a long analysis must not stall fetching for good)."""
"""Header on a record re-sent to its stage's topic from the retry topic: how many
retry-topic attempts it has had."""
ORIGINAL_MAX_CHARS = 900_000
"""Cap on the consumed record kept in a retry or DLQ record (Kafka's default message
limit is 1 MB); pipeline records are far smaller, so a replay gets them whole."""


class Watchdog:
    """Progress tracking for liveness: stalled means work is pending and none finished
    for `stall_s`. Idle is not stalled, and neither is a stage paused for an outage (it
    beats on every probe): a restart would not bring a dependency back."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.in_flight = 0
        self.last = time.monotonic()

    def started(self) -> None:
        if self.in_flight == 0:
            self.last = time.monotonic()
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds without progress while work is pending; 0.0 when not stalled."""
        idle = time.monotonic() - self.last
        return idle if self.in_flight > 0 and idle > self.stall_s else 0.0


class InFlight:
    """When each record a stage is working on was taken, for the age of the oldest.

    The consumer commits no offset past a record in flight (`offsets.py`), so one
    record stuck in a stage (a hung call, a store outage the stage waits out) holds its
    partition's commits back while later records keep flowing: consumer lag only creeps
    up, and a restart redelivers everything after it. The oldest record's age shows it
    at once (`synthwatch_oldest_in_flight_seconds`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._taken: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()

    def start(self, stage: str) -> int:
        token = next(self._tokens)
        self._taken.setdefault(stage, {})[token] = self._clock()
        return token

    def finish(self, stage: str, token: int) -> None:
        self._taken.get(stage, {}).pop(token, None)

    def oldest_s(self, stage: str) -> float:
        """Seconds since the oldest unfinished record of `stage` was taken; 0.0 if none."""
        taken = self._taken.get(stage)
        return self._clock() - min(taken.values()) if taken else 0.0


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
        # A short connect timeout: an unreachable store must read as an outage within
        # seconds (the stage pauses, readiness turns false), not after a minute per call.
        # No SHA-256 of each body for the signature: every upload carries a checksum
        # header that is signed and that the store verifies (the sha256 we record, or
        # botocore's CRC32), as botocore itself decides over HTTPS. Over the HTTP of a
        # private store, signing the body costs another pass over every byte: a 90 MB
        # put to SeaweedFS costs 0.35 CPU-s/GB this way, 1.18 signed with botocore's
        # CRC32 (benchmarks/bench_store.py).
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


class Pipeline:
    """The faust app and the resources its agents share, built for one role."""

    def __init__(self, settings: Settings, role: Role) -> None:
        self.settings = settings
        self.role = role
        k = settings.kafka
        kw = client_kwargs(k)
        tracing.setup(settings.tracing.otlp_endpoint)
        self.work_dir = Path(tempfile.mkdtemp(prefix="synthwatch-work-", dir=settings.work_dir))
        self.app = CommitSafeApp(
            k.app_id,
            # faust keeps table state under its datadir even with the memory store; the
            # default (`<app id>-data` in the working directory) breaks a read-only root
            # filesystem and litters the checkout.
            datadir=str(self.work_dir / "faust"),
            consumer_group_instance_id=k.group_instance_id,
            broker=f"kafka://{k.bootstrap_servers}",
            broker_credentials=_faust_credentials(kw),
            store="memory://",
            autodiscover=False,
            topic_allow_declare=False,
            topic_disable_leader=True,  # no leader-only features used; saves a topic
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            producer_request_timeout=k.producer_request_timeout_s,
            broker_commit_every=1,
            broker_commit_interval=1.0,
            web_enabled=True,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            web_host=settings.web_host,
            stream_wait_empty=True,
            broker_max_poll_interval=k.max_poll_interval_s,
            broker_session_timeout=k.session_timeout_s,
            broker_heartbeat_interval=min(3.0, k.session_timeout_s / 3),
        )
        self.refs = self._raw_topic(k.topic_refs)
        self.fetched = self._raw_topic(k.topic_fetched)
        self.verdicts = self._raw_topic(k.topic_verdicts)
        self.alerts = self._raw_topic(k.topic_alerts)
        self.dlq = self._raw_topic(k.topic_dlq)
        self.retry = self._raw_topic(k.topic_retry)
        self.stage_topics = {
            "fetch": self.refs,
            "detect": self.fetched,
            "decide": self.verdicts,
            "sink": self.alerts,
        }
        self.pool = ThreadPoolExecutor(
            max_workers=max(2, k.detect_concurrency + k.fetch_concurrency),
            thread_name_prefix="sw-work",
        )
        # Health probes get their own thread, so readiness stays current while every
        # work thread is busy with a long decode.
        self.probe_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sw-probe")
        self.faults = FaultPoints(settings.fault_points)
        self.watchdog = Watchdog(settings.health.stall_s)
        self.in_flight = InFlight()
        self.lag_reported: set[tuple[str, str]] = set()
        """(topic, partition) label sets of `synthwatch_consumer_lag` this worker serves."""
        self.down: dict[str, str] = {}
        """Dependencies found unreachable (name -> why); readiness is false while any is."""
        self.stages: set[Stage] = set()
        self.store = S3Store(s3_client(settings), settings.s3.bucket)
        self.policy = build_policy(settings)
        self.engine: Engine | None = None
        self.explainer: Explainer | None = None
        self.fetcher: Fetcher | None = None
        self.sink: WebhookSink | None = None
        self.handoff = (
            LocalHandoff(self.work_dir / "handoff", settings.kafka.handoff_max_bytes)
            if role == "all" and settings.kafka.handoff_max_bytes > 0
            else None
        )
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
            app.agent(self.refs, name="fetch", concurrency=k.fetch_concurrency)(
                self._stage("fetch", self._fetch)
            )
            self.stages.add("fetch")
        if role in ("detect", "all"):
            self.engine = Engine(self.settings)
            app.agent(self.fetched, name="detect", concurrency=k.detect_concurrency)(
                self._stage("detect", self._detect)
            )
            self.stages.add("detect")
        if role in ("decide", "all"):
            # decide loads no detector at start: policy, the blob and the verdict's
            # timeline; the explainer loads a torch module on the first alerting verdict.
            app.agent(self.verdicts, name="decide")(self._stage("decide", self._decide))
            self.stages.add("decide")
        if role == "sink" or (role == "all" and self.settings.sink.url):
            # Raises InvalidInput at start when the sink role has no endpoint.
            self.sink = WebhookSink(
                self.settings.sink, on_attempt=_count_delivery, host=socket.gethostname()
            )
            for outcome in ("delivered", "retried", "dead_lettered"):
                metrics.SINK_DELIVERIES.labels(self.settings.sink.format, outcome)
            app.agent(self.alerts, name="sink")(self._stage("sink", self._deliver))
            self.stages.add("sink")
        # Series at zero from the start, so a dashboard's rate() sees the first record.
        for stage in self.stages:
            for outcome in ("ok", "retry", "dlq"):
                metrics.ITEMS.labels(stage, outcome)
        # Every role reads the retry topic (one consumer group, so each record is read
        # once) and sends each due record back to its stage's input topic.
        app.agent(self.retry, name="retry")(self._retry_agent)
        # faust turns a page function into a View's `get`, called as (view, request), so
        # these must be plain functions (closures), not bound methods.
        app.page("/metrics")(_view(self._metrics))
        app.page("/health/live")(_view(self._live))
        app.page("/health/ready")(_view(self._ready))
        app.timer(interval=10.0)(self._update_lag)
        app.timer(interval=5.0)(self._probe_dependencies)
        app.task(self._on_start)

    @property
    def uses_store(self) -> bool:
        """Whether a stage here reads or writes S3 (the sink only talks to its webhook)."""
        return bool(self.stages - {"sink"})

    async def _on_start(self) -> None:
        """Make sure the bucket exists. A faust task that raises crashes the whole app,
        so a store that is down (or going down) at start is treated as the outage it is:
        not ready, logged, tried again with backoff, never a crash."""
        if not self.uses_store:
            return
        attempt = 0
        while True:
            try:
                await self._blocking(_storage_errors(lambda _raw: self.store.ensure_bucket()), None)
            except Exception as exc:
                attempt += 1
                error = f"{type(exc).__name__}: {exc}"[:300]
                self.down["s3"] = error
                metrics.DEPENDENCY_UP.labels("s3").set(0)
                log.error(
                    "object store unavailable at start: retrying", error=error, attempt=attempt
                )
                self.watchdog.beat()
                await asyncio.sleep(
                    backoff(attempt, 1.0, self.settings.retry.outage_backoff_max_s) + 0.5
                )
                continue
            if attempt:
                self.down.pop("s3", None)
                metrics.DEPENDENCY_UP.labels("s3").set(1)
                log.warning("object store answers again: bucket ready", attempts=attempt + 1)
            return

    def _fetch(self, raw: bytes | None) -> tuple[Any, bytes, bytes] | None:
        # media.refs -> MediaRef -> download, hash, sniff -> blob in S3 -> FetchedMedia
        ref = decode(raw, MediaRef)
        assert self.fetcher is not None
        item_dir = Path(tempfile.mkdtemp(dir=self.work_dir))
        # --role all: fetch at the pace its own detect takes the files (see LocalHandoff).
        paced = self.handoff.room(HANDOFF_WAIT_S) if self.handoff else contextlib.nullcontext()
        try:
            with paced:
                got = self.fetcher.fetch(ref.url, item_dir)
                structlog.contextvars.bind_contextvars(sha256=got.sha256, id=ref.id)
                key = blob_key(self.settings.s3.blob_prefix, got.sha256)
                # Popular media is submitted again and again: skip the upload when present
                # (the conditional PUT would refuse it anyway, after sending every byte).
                if not self.store.exists(key):
                    self.store.put_file_if_absent(
                        key, got.path, content_type=got.mime, sha256=got.sha256
                    )
                self.faults.hit("fetch.after_store")
                if self.handoff is not None and got.path.parent == item_dir:
                    self.handoff.put(got.sha256, got.path)
        finally:
            shutil.rmtree(item_dir, ignore_errors=True)
        out = FetchedMedia(
            id=ref.id,
            # The media is in our store now: later stages never need the origin's
            # signature or credentials, and verdicts and alerts must not carry them.
            url=redact_url(ref.url),
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
        self.faults.hit("detect.before")
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
        verdict = analysis.verdict
        metrics.VERDICTS.labels(verdict.media_type, verdict.decision, verdict.model_set).inc()
        if fm.submitted_at > 0:
            metrics.END_TO_END_SECONDS.labels(verdict.media_type).observe(
                max(0.0, time.time() - fm.submitted_at)
            )
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
        self.faults.hit("decide.after_evidence")
        alert, bundle = decided
        metrics.ALERTS.labels(alert.decision).inc()
        log.info(
            "alert",
            alert_id=alert.alert_id,
            evidence=bundle.manifest_key,
            evidence_created=bundle.created,
        )
        return self.alerts, alert.alert_id.encode(), encode(alert)

    def _deliver(self, raw: bytes | None) -> None:
        # media.alerts -> Alert -> POST to the webhook (retried there; DeliveryFailed
        # is permanent, so an undeliverable alert goes to the DLQ with reason `delivery`)
        alert = decode(raw, Alert)
        structlog.contextvars.bind_contextvars(id=alert.id, alert_id=alert.alert_id)
        assert self.sink is not None
        self.sink.deliver(alert)
        return None

    # -- plumbing shared by every stage ---------------------------------------------

    def _local_blob(self, key: str, sha256: str) -> _BlobFile:
        # A record names the blob and its hash; only the key the hash gives is ours to
        # read (a forged record could otherwise name any object in the bucket).
        expected = blob_key(self.settings.s3.blob_prefix, sha256)
        if key != expected:
            raise SchemaInvalid(f"blob {key!r} is not the blob of sha256 {sha256[:16]}…")
        path = self.work_dir / f"{sha256}-{time.monotonic_ns()}"
        handed = self.handoff is not None and self.handoff.take(sha256, path)
        return _BlobFile(self.store, key, path, present=handed)

    def _stage(
        self, stage: Stage, work: Callable[[bytes | None], tuple[Any, bytes, bytes] | None]
    ) -> Callable[[Any], Awaitable[None]]:
        after_send = {"detect": "detect.after_verdict", "decide": "decide.after_alert"}.get(stage)
        # Read at scrape time, so the age keeps growing while the record is stuck.
        metrics.OLDEST_IN_FLIGHT.labels(stage).set_function(
            functools.partial(self.in_flight.oldest_s, stage)
        )

        async def agent(stream: Any) -> None:
            async for event in stream.events():
                msg = event.message
                attempt = _attempt(msg)
                structlog.contextvars.bind_contextvars(
                    stage=stage, topic=msg.topic, partition=msg.partition, offset=msg.offset
                )
                if attempt:
                    structlog.contextvars.bind_contextvars(attempt=attempt)
                t0 = time.perf_counter()
                self.watchdog.started()
                token = self.in_flight.start(stage)
                try:
                    with tracing.span(
                        f"synthwatch.{stage}",
                        parent=getattr(msg, "headers", None),
                        attributes={
                            "messaging.system": "kafka",
                            "messaging.destination.name": msg.topic,
                            "messaging.destination.partition.id": str(msg.partition),
                            "messaging.kafka.offset": msg.offset,
                            "synthwatch.attempt": attempt,
                        },
                    ) as span:
                        await self._handle(stage, work, event, attempt, after_send, span)
                finally:
                    self.in_flight.finish(stage, token)
                    self.watchdog.finished()
                    metrics.STAGE_SECONDS.labels(stage).observe(time.perf_counter() - t0)
                    structlog.contextvars.clear_contextvars()

        agent.__name__ = f"{stage}_agent"
        return agent

    async def _handle(
        self,
        stage: Stage,
        work: Callable[[bytes | None], tuple[Any, bytes, bytes] | None],
        event: Any,
        attempt: int,
        after_send: str | None,
        span: Span,
    ) -> None:
        """One record through its stage: output sent (with this span's trace context),
        or the record routed to the retry topic or the DLQ."""
        try:
            result = await self._run(stage, work, event.value)
            if result is not None:
                topic, key, value = result
                await self._send(topic, key, value, tracing.current_headers())
                if after_send is not None and self.faults.armed:
                    self.faults.hit(after_send)
            metrics.ITEMS.labels(stage, "ok").inc()
        except SynthwatchError as exc:
            span.set_status(StatusCode.ERROR, exc.reason)
            if is_permanent(exc):
                await self._dead_letter(stage, event, exc.reason, str(exc), attempt)
            else:
                await self._retry_later(stage, event, exc, attempt)
        except Exception as exc:  # a bug must not wedge the partition: route it
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            log.exception("unexpected error", error_type=type(exc).__name__)
            await self._dead_letter(stage, event, "internal", type(exc).__name__, attempt)

    async def _run(self, stage: Stage, work: Callable[[bytes | None], T], value: bytes | None) -> T:
        """`work` with in-place retries; while our own store is down, pause and resume.

        A storage failure is this record's (a throttled or refused request: it goes on
        to the retry topic) when the store answers a probe; when the store does not
        answer, it is an outage of ours, which must not spend the record's attempts or
        send a whole partition to the DLQ: the stage waits for the store, reports
        not-ready meanwhile, and runs the record again.
        """
        while True:
            try:
                return await self._with_retries(stage, work, value)
            except StorageFailed as exc:
                if await self._probe(self._store_up):
                    raise
                await self._wait_for_store(str(exc))

    async def _with_retries(
        self, stage: Stage, work: Callable[[bytes | None], T], value: bytes | None
    ) -> T:
        r = self.settings.retry
        for attempt in range(1, r.inline_attempts + 1):
            try:
                return await self._blocking(_storage_errors(work), value)
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

    async def _wait_for_store(self, error: str) -> None:
        self.down["s3"] = error[:300]
        metrics.DEPENDENCY_UP.labels("s3").set(0)
        log.error("object store unreachable: stage paused until it answers", error=error[:300])
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(
                backoff(attempt, 1.0, self.settings.retry.outage_backoff_max_s) + 0.5
            )
            self.watchdog.beat()  # waiting on a dependency is not a stall
            if await self._probe(self._store_up):
                break
        self.down.pop("s3", None)
        metrics.DEPENDENCY_UP.labels("s3").set(1)
        log.warning("object store answers again: stage resumed", probes=attempt)

    async def _retry_later(
        self, stage: Stage, event: Any, exc: SynthwatchError, attempt: int
    ) -> None:
        """A transient failure that in-place retries did not cure: the retry topic, or
        the DLQ once the record has had `retry.topic_attempts` trips through it."""
        if attempt >= self.settings.retry.topic_attempts:
            error = f"gave up after {attempt + 1} rounds of attempts: {exc}"
            await self._dead_letter(stage, event, exc.reason, error, attempt)
            return
        record = self._letter(stage, event, exc.reason, str(exc), attempt + 1)
        log.warning("transient failure: to the retry topic", reason=exc.reason, next=attempt + 1)
        metrics.RETRIED.labels(stage, exc.reason).inc()
        metrics.ITEMS.labels(stage, "retry").inc()
        await self._send(
            self.retry, (record.id or "").encode(), encode(record), _trace_headers(event)
        )

    async def _retry_agent(self, stream: Any) -> None:
        """Hold each retry record until it is due, then send its original back to the
        stage's input topic with the attempt count in a header.

        Records arrive roughly in due order (the delay grows with the attempt, not with
        the record), so waiting on the head of a partition delays little else.
        """
        r = self.settings.retry
        async for event in stream.events():
            self.watchdog.started()
            try:
                letter = decode(event.value, DeadLetter)
                target = self.stage_topics.get(letter.stage)
                if target is None:
                    raise SchemaInvalid(f"retry record for unknown stage {letter.stage!r}")
                rng = random.Random(f"{letter.id}:{letter.attempt}")  # same delay on redelivery
                due = letter.failed_at + backoff(
                    letter.attempt, r.topic_backoff_s, r.topic_backoff_max_s, rng
                )
                while (wait := due - time.time()) > 0:
                    self.watchdog.beat()
                    await asyncio.sleep(min(wait, 5.0))
                await self._send(
                    target,
                    event.key,
                    letter.original.encode(),
                    [(ATTEMPT_HEADER, str(letter.attempt).encode()), *_trace_headers(event)],
                )
            except SynthwatchError as exc:  # a bad retry record, or one the broker refuses
                await self._dead_letter("retry", event, exc.reason, str(exc), 0)
            finally:
                self.watchdog.finished()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        # run_in_executor does not carry contextvars over: copy them, so the worker
        # thread's log lines keep the record's topic, partition and offset.
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(ctx.run, fn, *args)
        )

    def _letter(
        self, stage: LetterStage, event: Any, reason: str, error: str, attempt: int
    ) -> DeadLetter:
        msg = event.message
        value = event.value
        original = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else ""
        key = (
            event.key.decode("utf-8", "backslashreplace") if isinstance(event.key, bytes) else None
        )
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

    async def _dead_letter(
        self, stage: LetterStage, event: Any, reason: str, error: str, attempt: int
    ) -> None:
        record = self._letter(stage, event, reason, error, attempt)
        log.warning("dead-lettered", reason=reason, error=error[:300])
        metrics.DLQ.labels(stage, reason).inc()
        metrics.ITEMS.labels(stage, "dlq").inc()
        key, headers = (record.id or "").encode(), _trace_headers(event)
        try:
            await self._send(self.dlq, key, encode(record), headers)
        except TooLarge:
            # The original kept verbatim is what made it too large: send the record
            # without it (topic, partition and offset still say where it is).
            log.error("DLQ record too large for the broker: sent without the original")
            await self._send(
                self.dlq, key, encode(msgspec.structs.replace(record, original="")), headers
            )

    async def _send(self, topic: Any, key: bytes | None, value: bytes, headers: Any) -> None:
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
                error = f"{type(cause or exc).__name__}: {cause or exc}"[:300]
                self.down["kafka"] = error
                metrics.DEPENDENCY_UP.labels("kafka").set(0)
                log.error(
                    "send failed: the record is kept and sent again",
                    topic=topic.get_topic_name(),
                    error=error,
                    attempt=attempt,
                )
                self.watchdog.beat()
                await asyncio.sleep(
                    backoff(attempt, 1.0, self.settings.retry.outage_backoff_max_s) + 0.5
                )
                continue
            if attempt:
                log.warning("the broker took the record", attempts=attempt + 1)
            return

    # -- web views and timers -----------------------------------------------------

    def _metrics(self, view: Any) -> Any:
        return view.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    def _live(self, view: Any) -> Any:
        # Progress, not broker reachability: a worker that cannot reach the broker is
        # not fixed by a restart, a worker wedged on a record is.
        stalled = self.watchdog.stalled_for()
        body: dict[str, Any] = {"live": not stalled, "in_flight": self.watchdog.in_flight}
        if stalled:
            body["stalled_s"] = round(stalled, 1)
        return view.json(body, status=503 if stalled else 200)

    def _ready(self, view: Any) -> Any:
        assigned = len(self.app.consumer.assignment())
        ready = assigned > 0 and not self.down
        body: dict[str, Any] = {"ready": ready, "partitions": assigned}
        if self.down:
            body["down"] = dict(self.down)
        return view.json(body, status=200 if ready else 503)

    async def _probe(self, check: Callable[[], bool]) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self.probe_pool, check)

    def _store_up(self) -> bool:
        try:
            self.store.client.head_bucket(Bucket=self.store.bucket)
        except Exception:  # any failure to answer is "down" for readiness
            return False
        return True

    def _broker_up(self) -> bool:
        """A TCP connection to any bootstrap server opens (the consumer's own
        reconnection is aiokafka's business; this only feeds readiness)."""
        for server in self.settings.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                    return True
            except (OSError, ValueError):
                continue
        return False

    async def _probe_dependencies(self) -> None:
        checks = [("kafka", self._broker_up)]
        if self.uses_store:
            checks.append(("s3", self._store_up))
        for name, check in checks:
            try:
                up = await self._probe(check)
            except Exception:  # a timer must never raise (it would crash the app)
                up = False
            metrics.DEPENDENCY_UP.labels(name).set(1 if up else 0)
            if up:
                self.down.pop(name, None)
            elif name not in self.down:
                self.down[name] = "does not answer"
                log.warning("dependency unreachable", dependency=name)

    async def _update_lag(self) -> None:
        # A timer that raises crashes the whole faust app, so nothing may escape: the
        # fault suite found a rebalance leaving a new partition without a high-water mark.
        try:
            await self._measure_lag()
        except Exception as exc:
            log.warning("consumer lag not measured", error=f"{type(exc).__name__}: {exc}")

    async def _measure_lag(self) -> None:
        consumer = self.app.consumer
        assigned = {(tp.topic, str(tp.partition)) for tp in consumer.assignment()}
        # A partition handed to another member in a rebalance is that member's to
        # report: a series left at its last value here would count its lag twice.
        for gone in self.lag_reported - assigned:
            metrics.CONSUMER_LAG.remove(*gone)
        self.lag_reported &= assigned
        for tp in consumer.assignment():
            # faust keeps the committed offsets in a private map and offers no accessor.
            committed = getattr(consumer, "_committed_offset", {}).get(tp)
            position = committed if committed is not None else await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position is None or highwater is None:  # not fetched yet (just assigned)
                continue
            lag = max(0, highwater - position)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            self.lag_reported.add((tp.topic, str(tp.partition)))

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
        if self.engine is not None:
            self.engine.close()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.sink is not None:
            self.sink.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.probe_pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _attempt(message: Any) -> int:
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


def _trace_headers(event: Any) -> tracing.Headers:
    """Trace context for a record produced about `event`: the current span's (a stage
    routing its record), else the consumed record's own (the retry agent passing it on)."""
    return tracing.current_headers() or tracing.trace_headers(
        getattr(event.message, "headers", None)
    )


def _count_delivery(attempt: Attempt) -> None:
    metrics.SINK_DELIVERIES.labels(attempt.format, attempt.outcome).inc()
    # The endpoint is up when it answered this attempt with anything but a sign of its
    # own trouble (no answer, 408, 429, 5xx): a 400 for one alert is that alert's fault.
    status = attempt.status
    down = status is None or status in (408, 429) or status >= 500
    metrics.DEPENDENCY_UP.labels("sink").set(0 if down else 1)


def _storage_errors(work: Callable[[bytes | None], T]) -> Callable[[bytes | None], T]:
    """botocore's own exceptions (connection refused, endpoint unreachable) as
    StorageFailed, so they are retried and paused on rather than called a bug."""

    def run(value: bytes | None) -> T:
        from botocore.exceptions import BotoCoreError

        try:
            return work(value)
        except BotoCoreError as exc:
            raise StorageFailed(f"S3 unreachable: {type(exc).__name__}") from None

    return run


def _view(handler: Callable[[Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def page(view: Any, request: Any) -> Any:
        return handler(view)

    return page


class _BlobFile:
    """Download a blob to a local file for the duration of a `with` block (`present`:
    the file is there already, handed over by this worker's fetch stage)."""

    def __init__(self, store: S3Store, key: str, path: Path, *, present: bool = False) -> None:
        self.store, self.key, self.path, self.present = store, key, path, present

    def __enter__(self) -> Path:
        if self.present:
            return self.path
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
