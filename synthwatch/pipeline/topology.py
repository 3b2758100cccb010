"""The streaming topology: one faust app, the whole data flow in this file.

    media.refs      MediaRef        --[fetch]-->   media.fetched   FetchedMedia
                                                   (blob written to S3 under its sha256)
    media.fetched   FetchedMedia    --[detect]-->  media.verdicts  Verdict
                                                   (sample, faces, batched inference, fuse, policy)
    media.verdicts  Verdict         --[decide]-->  media.alerts    Alert
                                                   (evidence bundle written to S3 first;
                                                   a re-scan that changed the decision
                                                   alerts whatever the new one)
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

This module is the flow: the app, its topics and agents, and what each stage does with
a record. Where a record goes afterwards (sends, in-place retries, the retry topic, the
DLQ and its guard) is `routing.py`; liveness, readiness, dependency probes and consumer
lag are `health.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import faust
import structlog
from opentelemetry.trace import Span, StatusCode

from synthwatch.errors import (
    SchemaInvalid,
    StorageFailed,
    SynthwatchError,
    is_permanent,
)
from synthwatch.models.registry import ModelStore
from synthwatch.operators.alert import alert_with_evidence, alerts_on
from synthwatch.operators.backoff import backoff
from synthwatch.operators.evidence import EvidenceFrame, model_weights
from synthwatch.operators.explainer import Explainer, evidence_frames
from synthwatch.operators.fetch import Fetcher
from synthwatch.operators.policy import Policy
from synthwatch.operators.redact import redact_url
from synthwatch.operators.report import ReportContext
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalHandoff, S3Store, blob_key, s3_client
from synthwatch.operators.webhook import Attempt, WebhookSink
from synthwatch.pipeline import metrics, tracing
from synthwatch.pipeline.engine import Engine, Item, blob_context, store_scorer
from synthwatch.pipeline.faults import FaultPoints
from synthwatch.pipeline.health import Health
from synthwatch.pipeline.kafka import client_kwargs, stage_input_topics
from synthwatch.pipeline.offsets import App as CommitSafeApp
from synthwatch.pipeline.routing import Router, Stage, attempt_of
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import (
    Alert,
    FetchedMedia,
    MediaRef,
    Verdict,
    decode,
    encode,
)

Role = Literal["fetch", "detect", "decide", "sink", "all"]
T = TypeVar("T")

log = structlog.get_logger("synthwatch.topology")

HANDOFF_WAIT_S = 30.0
"""--role all: how long a fetch waits for its own detect stage to make room in the local
hand-off before going ahead anyway (a long analysis must not stall fetching for good)."""


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
        by_name = {
            t.get_topic_name(): t for t in (self.refs, self.fetched, self.verdicts, self.alerts)
        }
        self.stage_topics = {
            stage: by_name[name]
            for stage, name in stage_input_topics(k).items()
            if stage != "submit"
        }
        """The topic each stage consumes, where the retry agent sends a record back."""
        self.pool = ThreadPoolExecutor(
            max_workers=max(2, k.detect_concurrency + k.fetch_concurrency),
            thread_name_prefix="sw-work",
        )
        self.faults = FaultPoints(settings.fault_points)
        self.stages: set[Stage] = set()
        self.store = S3Store(s3_client(settings.s3), settings.s3.bucket)
        self.health = Health(
            stall_s=settings.health.stall_s, bootstrap_servers=k.bootstrap_servers, store=None
        )
        self.router = Router(
            settings.retry,
            retry=self.retry,
            dlq=self.dlq,
            stage_topics=self.stage_topics,
            health=self.health,
            blocking=self._blocking,
        )
        self.policy = Policy.from_settings(settings.policy)
        self.engine: Engine | None = None
        self.explainer: Explainer | None = None
        self.signer: Signer | None = None
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
            # timeline; the explainer opens ONNX sessions on the first alerting verdict.
            # The signing key is read now: a worker without a usable one fails at start.
            self.signer = Signer.from_settings(self.settings.signing)
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
        app.agent(self.retry, name="retry")(self.router.retry_agent)
        if self.uses_store:
            self.health.store = self.store
        health = self.health
        # faust turns a page function into a View's `get`, called as (view, request), so
        # these must be plain functions (closures), not bound methods.
        app.page("/metrics")(_view(health.metrics_page))
        app.page("/health/live")(_view(health.live_page))
        app.page("/health/ready")(
            _view(lambda view: health.ready_page(view, len(app.consumer.assignment())))
        )
        app.timer(interval=10.0)(self._update_lag)
        app.timer(interval=5.0)(health.probe_dependencies)
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
                self.health.mark_down("s3", error)
                log.error(
                    "object store unavailable at start: retrying", error=error, attempt=attempt
                )
                self.health.watchdog.beat()
                await asyncio.sleep(
                    backoff(attempt, 1.0, self.settings.retry.outage_backoff_max_s) + 0.5
                )
                continue
            if attempt:
                self.health.mark_up("s3")
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
            rescan=ref.rescan,  # a re-scan's marker rides along to the verdict
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
                    rescan=fm.rescan,
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
            store = ModelStore(self.settings.model_dir)
            self.explainer = Explainer(
                store,
                store_scorer(store, self.settings.models.threads),
                review_threshold=self.settings.policy.review_threshold,
                forensics=self.settings.models.forensics,
                sample=self.settings.sample,
            )
        return self.explainer

    def _decide(self, raw: bytes | None) -> tuple[Any, bytes, bytes] | None:
        # media.verdicts -> Verdict -> (alerting decision) evidence to S3 -> Alert
        verdict = decode(raw, Verdict)
        structlog.contextvars.bind_contextvars(sha256=verdict.sha256, id=verdict.id)
        # The policy's decisions alert; so does a re-scan that changed the decision,
        # whatever the new one: a `pass` there withdraws the earlier finding.
        if not alerts_on(verdict, self.policy):
            return None

        # The bundle's frames and the report's media facts come from one download of
        # the blob, made only when the bundle is not in the store yet.
        read: list[tuple[list[EvidenceFrame], ReportContext]] = []

        def from_blob() -> tuple[list[EvidenceFrame], ReportContext]:
            if not read:
                with self._local_blob(verdict.blob, verdict.sha256) as path:
                    frames = evidence_frames(verdict, path, self._explainer())
                    read.append((frames, blob_context(verdict, path, self.settings.sample)))
            return read[0]

        assert self.signer is not None
        decided = alert_with_evidence(
            verdict,
            lambda: from_blob()[0],
            self.store,
            evidence_prefix=self.settings.s3.evidence_prefix,
            policy=self.policy,
            signer=self.signer,
            weights=model_weights(verdict, self._explainer().store.weights_id),
            context=lambda: from_blob()[1],
        )
        if decided is None:
            return None
        self.faults.hit("decide.after_evidence")
        alert, bundle = decided
        metrics.ALERTS.labels(alert.decision).inc()
        log.info(
            "alert",
            alert_id=alert.alert_id,
            rescan=alert.rescan.run if alert.rescan is not None else None,
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
        health = self.health
        metrics.OLDEST_IN_FLIGHT.labels(stage).set_function(
            functools.partial(health.in_flight.oldest_s, stage)
        )

        async def agent(stream: Any) -> None:
            async for event in stream.events():
                msg = event.message
                attempt = attempt_of(msg)
                structlog.contextvars.bind_contextvars(
                    stage=stage, topic=msg.topic, partition=msg.partition, offset=msg.offset
                )
                if attempt:
                    structlog.contextvars.bind_contextvars(attempt=attempt)
                t0 = time.perf_counter()
                health.watchdog.started()
                token = health.in_flight.start(stage)
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
                    health.in_flight.finish(stage, token)
                    health.watchdog.finished()
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
                await self.router.send(topic, key, value, tracing.current_headers())
                if after_send is not None and self.faults.armed:
                    self.faults.hit(after_send)
            self.router.sent_on(stage)
            metrics.ITEMS.labels(stage, "ok").inc()
        except SynthwatchError as exc:
            span.set_status(StatusCode.ERROR, exc.reason)
            if is_permanent(exc):
                await self.router.dead_letter(stage, event, exc.reason, str(exc), attempt)
            else:
                await self.router.retry_later(stage, event, exc, attempt)
        except Exception as exc:  # a bug must not wedge the partition: route it
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            log.exception("unexpected error", error_type=type(exc).__name__)
            await self.router.dead_letter(stage, event, "internal", type(exc).__name__, attempt)

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
                return await self.router.with_retries(_storage_errors(work), value)
            except StorageFailed as exc:
                if await self.health.probe(self.health.store_up):
                    raise
                await self._wait_for_store(str(exc))

    async def _wait_for_store(self, error: str) -> None:
        health = self.health
        health.mark_down("s3", error)
        log.error("object store unreachable: stage paused until it answers", error=error[:300])
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(
                backoff(attempt, 1.0, self.settings.retry.outage_backoff_max_s) + 0.5
            )
            health.watchdog.beat()  # waiting on a dependency is not a stall
            if await health.probe(health.store_up):
                break
        health.mark_up("s3")
        log.warning("object store answers again: stage resumed", probes=attempt)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        # run_in_executor does not carry contextvars over: copy them, so the worker
        # thread's log lines keep the record's topic, partition and offset.
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(ctx.run, fn, *args)
        )

    async def _update_lag(self) -> None:
        await self.health.update_lag(self.app.consumer)

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
        self.health.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


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
