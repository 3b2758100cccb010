"""The scans the HTTP API accepted (`synthwatch serve`): records, queue, engine (or
the pipeline), reviews and callbacks.

`ScanService` owns one long-lived `Engine` (models load once; crops of concurrent scans
share batches), a thread pool that analyses `api.workers` scans at once, the scan
records (one JSON file per scan under `<data_dir>/scans/`, so a restart keeps the
history), the evidence store (`<data_dir>/evidence/`) and the audit log.

Every scan that finishes gets an evidence bundle, whatever its decision, so every scan
the review page lists has a report to open: alerting decisions through
`alert_with_evidence` (the bundle and alert id `synthwatch scan` writes), the others
with `write_bundle` under the same deterministic id. A scan that failed (a file that is
not media, a URL that cannot be fetched) has no bundle; its record says why.

In cluster mode (`api.mode=cluster`) there is no engine here: an upload is stored in the
bucket under `uploads/<scan id>`, a MediaRef goes to the refs topic, and `ClusterLink`
brings back the verdict, the alert (whose bundle the decide stage wrote and signed) or
the dead letter. A decision that does not alert has no bundle in the pipeline, so the
server writes one beside the others, signed with its own key: the verdict and the
report, without frames (only the decide stage re-decodes them).

A human review overrides the automatic decision: `decision` is the effective one,
`automatic_decision` what the policy said, `review` the latest review and `reviews`
all of them. Submissions, outcomes and reviews go to the audit log.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synthwatch.errors import InvalidInput, InvalidRef, RefusedAddress, SynthwatchError
from synthwatch.models.registry import ModelStore
from synthwatch.operators import netguard, sandbox
from synthwatch.operators.alert import alert_id, alert_with_evidence
from synthwatch.operators.backoff import backoff
from synthwatch.operators.evidence import model_weights, write_bundle
from synthwatch.operators.fetch import Fetcher
from synthwatch.operators.policy import Policy
from synthwatch.operators.report import ReportContext
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalStore, ObjectStore, S3Store, s3_client, sha256_bytes
from synthwatch.operators.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    shown_endpoint,
    sign,
)
from synthwatch.pipeline.audit import AuditLog
from synthwatch.pipeline.cluster import ClusterLink
from synthwatch.pipeline.engine import Engine, Item, sampled_evidence
from synthwatch.pipeline.scan import shown_source, verdict_record
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import Alert, DeadLetter, MediaRef, Verdict

log = structlog.get_logger("synthwatch.api")

Decision = Literal["flag", "review", "pass", "inconclusive"]
HumanDecision = Literal["flag", "review", "pass"]
"""What a reviewer may decide: `inconclusive` describes the detectors, not a person's
judgement; a reviewer who cannot decide leaves (or puts) the scan in `review`."""
Status = Literal["queued", "running", "done", "error"]

SCAN_ID_PATTERN = r"^[0-9a-f]{32}$"
_SCAN_ID = re.compile(SCAN_ID_PATTERN)
CALLBACK_ATTEMPTS = 3
CALLBACK_TIMEOUT_S = 10.0
SCAN_ID_HEADER = "X-Synthwatch-Scan-Id"
REPORT_NAMES = ("report.html", "report.json")
"""The bundle object a report request serves: the first the manifest lists."""


class Review(BaseModel):
    decision: HumanDecision
    reason: str
    reviewer: str
    """The API client that recorded it (the name its key is configured under)."""
    reviewed_at: float
    """Unix time."""
    previous_decision: Decision
    """The effective decision the review replaced."""


class Scan(BaseModel):
    """One scan as the API shows it."""

    id: str
    status: Status
    """queued -> running -> done, or error (see `error` and `reason`)."""
    kind: Literal["upload", "url"]
    source: str
    """The uploaded file's name, or the URL without credentials or signatures."""
    client: str
    """The API client that submitted it."""
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    decision: Decision | None = None
    """Effective decision: the latest review's, else the automatic one."""
    automatic_decision: Decision | None = None
    synthetic_score: float | None = None
    media_type: str | None = None
    sha256: str | None = None
    alert_id: str | None = None
    """Set when the policy alerts on the automatic decision (as `synthwatch scan` does)."""
    report: str | None = None
    """Path of the report (`GET /v1/scans/{id}/report`), once there is one."""
    error: str | None = None
    reason: str | None = None
    """Why the scan failed, as a DLQ reason: `unsupported_media`, `refused_address`, ..."""
    review: Review | None = None
    reviews: list[Review] = []
    verdict: dict[str, Any] | None = None
    """The full verdict (`verdict.v2` fields) once analysed."""


UPLOAD_PREFIX = "uploads"
"""Cluster mode: where an upload is stored in the bucket for the fetch stage to read."""


@dataclasses.dataclass
class _Waiting:
    """A cluster scan handed to the pipeline, and what has come back for it."""

    callback_url: str | None
    handed_at: float = dataclasses.field(default_factory=time.monotonic)
    verdict: Verdict | None = None
    verdict_at: float = 0.0
    alert: Alert | None = None
    alert_overdue: bool = False


def _outcome(
    scan_id: str, verdict: Verdict, alerted: str | None, manifest_key: str
) -> dict[str, Any]:
    """A finished scan's record fields from its verdict and its bundle."""
    return {
        "decision": verdict.decision,
        "automatic_decision": verdict.decision,
        "synthetic_score": verdict.synthetic_score,
        "media_type": verdict.media_type,
        "sha256": verdict.sha256,
        "alert_id": alerted,
        "verdict": verdict_record(verdict),
        "manifest_key": manifest_key,
        "report": f"/v1/scans/{scan_id}/report",
    }


class _Stored(Scan):
    """A scan record on disk: what the API shows, and where its bundle is."""

    manifest_key: str | None = None


def public(scan: Scan) -> Scan:
    return Scan.model_validate(scan.model_dump(exclude={"manifest_key"}))


class ScanRequest(BaseModel):
    """Scan the media at a URL (`POST /v1/scans` as JSON)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=8192)
    """http(s):// URL, fetched with the SSRF checks of the fetch stage."""
    callback_url: str | None = Field(default=None, min_length=1, max_length=8192)
    """POSTed the scan record, signed, when the scan finishes."""


class ReviewRequest(BaseModel):
    """A human decision on a finished scan."""

    model_config = ConfigDict(extra="forbid")

    decision: HumanDecision
    reason: str = Field(min_length=1, max_length=4000)
    """Why: required, kept in the audit log."""

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a reason: it must not be blank")
        return value.strip()


class ScanNotFound(LookupError):
    """No such scan, or it has no bundle object by that name (404)."""


class NotReady(Exception):
    """The scan has not finished (or failed), so it has no report or cannot be reviewed."""


class EvidenceAltered(Exception):
    """A stored bundle object no longer matches the sha256 its manifest lists."""


def is_scan_id(value: str) -> bool:
    return bool(_SCAN_ID.match(value))


def upload_name(raw: str) -> str:
    """An uploaded file's name as records and pages show it: the last path part of what
    the client sent, control characters dropped, at most 200 characters."""
    leaf = raw.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in leaf if ch.isprintable()).strip()
    return cleaned[:200] or "upload"


class ScanService:
    """Accepts scans, runs them on one engine, keeps their records. `start()` then
    `close()`; thread-safe."""

    def __init__(
        self, settings: Settings, *, engine: Engine | None = None, signer: Signer | None = None
    ) -> None:
        """`engine`: one the caller owns and closes (tests share one); by default
        `start()` loads one. `signer` signs the bundles; by default the configured key.

        Raises ConfigError when the audit log fails verification or the signing key
        cannot be read."""
        self.settings = settings
        root = settings.api.data_dir
        self._scans_dir = root / "scans"
        self.uploads_dir = root / "uploads"
        for folder in (self._scans_dir, self.uploads_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.cluster = settings.api.mode == "cluster"
        self.evidence: ObjectStore
        if self.cluster:
            # Bundles the decide stage writes are read where it writes them; the
            # server's own (for decisions that do not alert) go beside them.
            self.evidence = S3Store(s3_client(settings.s3), settings.s3.bucket)
            self._evidence_prefix = settings.s3.evidence_prefix
        else:
            self.evidence = LocalStore(root / "evidence")
            self._evidence_prefix = ""
        self._policy = Policy.from_settings(settings.policy)
        self._link: ClusterLink | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._signer = signer if signer is not None else Signer.from_settings(settings.signing)
        self.audit = AuditLog(root / "audit.jsonl")
        self._engine = engine
        self._owns_engine = engine is None
        self._lock = threading.Lock()
        self._scans: dict[str, _Stored] = self._load()
        self._pool: ThreadPoolExecutor | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Load the models (unless an engine was given) and start the workers.
        Raises ModelUnavailable like `synthwatch scan`."""
        if self.cluster:
            self._start_cluster()
            return
        workers = self.settings.api.workers
        try:
            if self._engine is None:
                self._engine = Engine(self.settings)
            sandbox.prestart(self.settings.sample.max_memory_mb, workers)
        except BaseException:
            self.audit.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="api-scan")

    def close(self) -> None:
        """Let the scans in progress finish; queued ones stay queued on disk and are
        marked interrupted at the next start."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._owns_engine and self._engine is not None:
            self._engine.close()
            self._engine = None
        self.audit.close()

    def _load(self) -> dict[str, _Stored]:
        scans: dict[str, _Stored] = {}
        for path in sorted(self._scans_dir.glob("*.json")):
            try:
                scan = _Stored.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                log.error("scan record unreadable, skipped", path=str(path), error=str(exc))
                continue
            if scan.status in ("queued", "running"):
                # The process that ran it is gone, and so is the upload's temporary file.
                scan = scan.model_copy(
                    update={
                        "status": "error",
                        "reason": "interrupted",
                        "error": "the server stopped before this scan finished; submit it again",
                        "finished_at": time.time(),
                    }
                )
                self._write(scan)
            scans[scan.id] = scan
        return scans

    def _write(self, scan: _Stored) -> None:
        path = self._scans_dir / f"{scan.id}.json"
        fd, tmp = tempfile.mkstemp(dir=self._scans_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(scan.model_dump_json(indent=1).encode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _update(self, scan_id: str, **changes: Any) -> _Stored:
        with self._lock:
            scan = self._scans[scan_id].model_copy(update=changes)
            self._write(scan)
            self._scans[scan_id] = scan
            return scan

    # -- queries ------------------------------------------------------------------------

    def get(self, scan_id: str) -> Scan:
        """Raises ScanNotFound."""
        with self._lock:
            scan = self._scans.get(scan_id)
        if scan is None:
            raise ScanNotFound(f"no scan {scan_id}")
        return public(scan)

    def recent(
        self,
        *,
        decision: Decision | None = None,
        status: Status | None = None,
        limit: int = 100,
    ) -> list[Scan]:
        """The most recent scans first, filtered on the effective decision and status."""
        with self._lock:
            scans = sorted(self._scans.values(), key=lambda s: s.submitted_at, reverse=True)
        chosen = [
            s
            for s in scans
            if (decision is None or s.decision == decision)
            and (status is None or s.status == status)
        ]
        return [public(s) for s in chosen[:limit]]

    # -- submission ---------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def upload_path(self, scan_id: str) -> Path:
        """Where the API streams the upload of scan `scan_id`."""
        if not is_scan_id(scan_id):
            raise ValueError(f"not a scan id: {scan_id!r}")
        return self.uploads_dir / f"{scan_id}.upload"

    def check_callback(self, url: str) -> None:
        """Refuse a callback URL the fetcher would refuse to fetch (scheme, credentials,
        private, loopback or metadata addresses unless `fetch.allow_private` or
        `fetch.allow_networks` allow them), or any callback when none can be signed.

        Raises InvalidInput, InvalidRef, RefusedAddress."""
        secret = self.settings.api.callback_secret
        if secret is None or not secret.get_secret_value():
            raise InvalidInput(
                "callback_url refused: callbacks are signed, and this server has no "
                "SYNTHWATCH_API__CALLBACK_SECRET"
            )
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidRef("callback_url refused: use an http:// or https:// URL")
        with Fetcher(self.settings.fetch, embedded=False) as fetcher:
            try:
                fetcher.precheck(url)
            except (InvalidRef, RefusedAddress) as exc:
                raise type(exc)(f"callback_url {exc}") from None

    def submit(
        self,
        client: str,
        *,
        scan_id: str | None = None,
        upload: Path | None = None,
        filename: str = "",
        url: str | None = None,
        callback_url: str | None = None,
    ) -> Scan:
        """Queue a scan of an uploaded file (already at `upload_path(scan_id)`) or of a
        URL. The URL and the callback URL are checked first (that may resolve names).

        Raises InvalidRef, RefusedAddress or InvalidInput for a reference that would be
        refused; the upload is deleted then."""
        try:
            if (upload is None) == (url is None):
                raise InvalidInput("give either a file or a url")
            if url is not None:
                if not url.lower().startswith(("http://", "https://")):
                    raise InvalidRef(
                        f"refused {shown_source(url)}: the API fetches http:// and https:// "
                        "URLs; upload a file instead"
                    )
                with Fetcher(self.settings.fetch, embedded=False) as fetcher:
                    fetcher.precheck(url)
            if callback_url is not None:
                self.check_callback(callback_url)
        except BaseException:
            if upload is not None:
                upload.unlink(missing_ok=True)
            raise
        scan_id = scan_id or self.new_id()
        if upload is not None:
            kind: Literal["upload", "url"] = "upload"
            source = upload_name(filename)
        else:
            assert url is not None
            kind, source = "url", shown_source(url)
        scan = _Stored(
            id=scan_id,
            status="queued",
            kind=kind,
            source=source,
            client=client,
            submitted_at=time.time(),
        )
        with self._lock:
            self._write(scan)
            self._scans[scan_id] = scan
        self.audit.append(
            "scan_submitted", scan_id=scan_id, client=client, kind=kind, source=source
        )
        if self.cluster:
            return public(self._hand_over(scan, upload, url, callback_url))
        if self._pool is None:
            raise RuntimeError("ScanService.start() was not called")
        self._pool.submit(self._run, scan_id, upload, url, callback_url)
        return public(scan)

    # -- the work -----------------------------------------------------------------------

    def _run(
        self, scan_id: str, upload: Path | None, url: str | None, callback_url: str | None
    ) -> None:
        scan = self._update(scan_id, status="running", started_at=time.time())
        try:
            with tempfile.TemporaryDirectory(dir=self.uploads_dir, prefix=f"{scan_id}.") as tmp:
                changes = self._analyse(scan, upload, url, Path(tmp))
            changes.update(status="done")
        except SynthwatchError as exc:
            changes = {"status": "error", "error": str(exc), "reason": exc.reason}
        except Exception as exc:  # a bug must not leave the scan "running" for ever
            log.exception("scan failed", scan_id=scan_id)
            changes = {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "reason": "internal",
            }
        finally:
            if upload is not None:
                upload.unlink(missing_ok=True)
        self._finished(scan_id, changes, callback_url)

    def _finished(self, scan_id: str, changes: dict[str, Any], callback_url: str | None) -> _Stored:
        """Record the outcome, audit it and call back."""
        scan = self._update(scan_id, finished_at=time.time(), **changes)
        self.audit.append(
            "scan_finished",
            scan_id=scan_id,
            status=scan.status,
            automatic_decision=scan.automatic_decision,
            synthetic_score=scan.synthetic_score,
            sha256=scan.sha256,
            reason=scan.reason,
        )
        if callback_url is not None:
            self._call_back(callback_url, public(scan))
        return scan

    def _analyse(
        self, scan: _Stored, upload: Path | None, url: str | None, tmp: Path
    ) -> dict[str, Any]:
        engine = self._engine
        assert engine is not None
        # Uploads are our own files (read in place); a URL never names a local file.
        with Fetcher(self.settings.fetch, embedded=upload is not None) as fetcher:
            fetched = fetcher.fetch(str(upload) if upload is not None else str(url), tmp)
        # Neither the server's paths nor a URL's secrets belong in a record that travels.
        shown = f"upload:{scan.source}" if upload is not None else scan.source
        item = dataclasses.replace(Item.local(fetched, source=scan.source), url=shown, blob="")
        analysis = engine.analyze(item)
        verdict = analysis.verdict
        frames = functools.partial(sampled_evidence, engine, analysis, fetched.path)
        weights = model_weights(verdict, engine.store.weights_id)
        # The policy's thresholds go on the report; so would container facts and the
        # audio track, once `scan` passes them too (ReportContext's other parts).
        context = functools.partial(ReportContext, policy=engine.policy)
        decided = alert_with_evidence(
            verdict,
            frames,
            self.evidence,
            evidence_prefix="",
            policy=engine.policy,
            signer=self._signer,
            weights=weights,
            context=context,
        )
        if decided is not None:
            alert, bundle = decided
            alerted: str | None = alert.alert_id
        else:
            alerted = None
            bundle = write_bundle(
                self.evidence,
                prefix="",
                alert_id=alert_id(verdict.sha256, verdict.model_set, verdict.policy_version),
                verdict=verdict,
                frames=frames,
                signer=self._signer,
                weights=weights,
                context=context,
            )
        return _outcome(scan.id, verdict, alerted, bundle.manifest_key)

    # -- cluster mode -------------------------------------------------------------------

    def _start_cluster(self) -> None:
        assert isinstance(self.evidence, S3Store)
        try:
            self.evidence.ensure_bucket()
            self._link = ClusterLink(
                self.settings,
                on_verdict=self._on_verdict,
                on_alert=self._on_alert,
                on_dead_letter=self._on_dead_letter,
                on_tick=self._on_tick,
            )
            self._link.start()
        except BaseException:
            self._link = None
            self.audit.close()
            raise

    def _hand_over(
        self, scan: _Stored, upload: Path | None, url: str | None, callback_url: str | None
    ) -> _Stored:
        """Cluster mode: store an upload in the bucket, produce the MediaRef; the outcome
        arrives on the topics. A failure to hand over ends the scan in error at once."""
        assert self._link is not None
        scan = self._update(scan.id, status="running", started_at=time.time())
        with self._lock:
            self._waiting[scan.id] = _Waiting(callback_url=callback_url)
        try:
            if upload is not None:
                key = f"{UPLOAD_PREFIX}/{scan.id}"
                self.evidence.put_file_if_absent(
                    key, upload, content_type="application/octet-stream"
                )
                ref_url = f"s3://{self.settings.s3.bucket}/{key}"
            else:
                assert url is not None
                ref_url = url
            self._link.submit(
                MediaRef(
                    id=scan.id, url=ref_url, source=scan.source, submitted_at=scan.submitted_at
                )
            )
        except SynthwatchError as exc:
            with self._lock:
                self._waiting.pop(scan.id, None)
            return self._finished(
                scan.id, {"status": "error", "error": str(exc), "reason": exc.reason}, callback_url
            )
        finally:
            if upload is not None:
                upload.unlink(missing_ok=True)
        return scan

    def _on_verdict(self, verdict: Verdict) -> None:
        with self._lock:
            waiting = self._waiting.get(verdict.id)
            if waiting is None or waiting.verdict is not None:
                return  # another server's scan, or a redelivery
            waiting.verdict, waiting.verdict_at = verdict, time.monotonic()
        self._maybe_finish(verdict.id)

    def _on_alert(self, alert: Alert) -> None:
        with self._lock:
            waiting = self._waiting.get(alert.id)
            if waiting is None:
                return
            waiting.alert = alert
        self._maybe_finish(alert.id)

    def _on_dead_letter(self, letter: DeadLetter) -> None:
        if letter.id is None:
            return
        with self._lock:
            waiting = self._waiting.get(letter.id)
            if waiting is None or waiting.verdict is not None:
                return
            del self._waiting[letter.id]
        changes = {"status": "error", "error": letter.error, "reason": letter.reason}
        self._finished(letter.id, changes, waiting.callback_url)

    def _on_tick(self) -> None:
        """Deadlines: no outcome within `api.cluster_timeout_s`; an alerting verdict whose
        alert has not come within `api.alert_wait_s` (the server writes the bundle)."""
        now = time.monotonic()
        api = self.settings.api
        late: list[tuple[str, _Waiting]] = []
        with self._lock:
            for scan_id, waiting in list(self._waiting.items()):
                if waiting.verdict is not None and now - waiting.verdict_at > api.alert_wait_s:
                    waiting.alert_overdue = True
                    late.append((scan_id, waiting))
                elif waiting.verdict is None and now - waiting.handed_at > api.cluster_timeout_s:
                    del self._waiting[scan_id]
                    late.append((scan_id, waiting))
        for scan_id, waiting in late:
            if waiting.verdict is not None:
                self._maybe_finish(scan_id)
                continue
            changes = {
                "status": "error",
                "reason": "timeout",
                "error": f"no verdict from the pipeline within {api.cluster_timeout_s:.0f} s",
            }
            self._finished(scan_id, changes, waiting.callback_url)

    def _maybe_finish(self, scan_id: str) -> None:
        """Finish a cluster scan once its verdict is here and, when the decision alerts,
        its alert (or the wait for it is over)."""
        with self._lock:
            waiting = self._waiting.get(scan_id)
            if waiting is None or waiting.verdict is None:
                return
            verdict = waiting.verdict
            alerts = self._policy.alerts(verdict.decision)
            if alerts and waiting.alert is None and not waiting.alert_overdue:
                return
            del self._waiting[scan_id]
        try:
            changes = self._cluster_outcome(scan_id, verdict, waiting.alert)
        except SynthwatchError as exc:
            changes = {"status": "error", "error": str(exc), "reason": exc.reason}
        except Exception as exc:
            log.exception("scan outcome failed", scan_id=scan_id)
            changes = {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}",
                "reason": "internal",
            }
        self._finished(scan_id, changes, waiting.callback_url)

    def _cluster_outcome(
        self, scan_id: str, verdict: Verdict, alert: Alert | None
    ) -> dict[str, Any]:
        if alert is not None:
            # The decide stage's bundle, signed with the pipeline's key.
            manifest_key = alert.evidence_uri.removeprefix(f"s3://{self.settings.s3.bucket}/")
            changes = _outcome(scan_id, verdict, alert.alert_id, manifest_key)
        else:
            # A decision that does not alert has no bundle in the pipeline: the server
            # writes one (report and verdict; no frames, which only decide re-decodes).
            same = self._policy.version == verdict.policy_version
            bundle = write_bundle(
                self.evidence,
                prefix=self._evidence_prefix,
                alert_id=alert_id(verdict.sha256, verdict.model_set, verdict.policy_version),
                verdict=verdict,
                frames=list,
                signer=self._signer,
                weights=model_weights(verdict, ModelStore(self.settings.model_dir).weights_id),
                context=lambda: ReportContext(policy=self._policy if same else None),
            )
            changes = _outcome(scan_id, verdict, None, bundle.manifest_key)
        changes["status"] = "done"
        return changes

    # -- reviews ------------------------------------------------------------------------

    def review(self, scan_id: str, client: str, request: ReviewRequest) -> Scan:
        """Record a human decision: it becomes the effective one. Raises ScanNotFound,
        NotReady (the scan has not finished, or failed: nothing to review)."""
        with self._lock:
            scan = self._scans.get(scan_id)
            if scan is None:
                raise ScanNotFound(f"no scan {scan_id}")
            if scan.status != "done" or scan.decision is None:
                raise NotReady(
                    f"scan {scan_id} is {scan.status}: only a finished scan can be reviewed"
                )
            entry = Review(
                decision=request.decision,
                reason=request.reason,
                reviewer=client,
                reviewed_at=time.time(),
                previous_decision=scan.decision,
            )
            # The audit entry is written first: a review the log does not hold never shows.
            self.audit.append(
                "review_recorded",
                scan_id=scan_id,
                client=client,
                decision=entry.decision,
                previous_decision=entry.previous_decision,
                automatic_decision=scan.automatic_decision,
                reason=entry.reason,
            )
            updated = scan.model_copy(
                update={
                    "decision": entry.decision,
                    "review": entry,
                    "reviews": [*scan.reviews, entry],
                }
            )
            self._write(updated)
            self._scans[scan_id] = updated
        return public(updated)

    # -- reports ------------------------------------------------------------------------

    def report(self, scan_id: str) -> tuple[bytes, str]:
        """(bytes, name) of the scan's report: `report.html` when its bundle has one,
        else `report.json`. Raises ScanNotFound, NotReady, EvidenceAltered."""
        manifest = self._manifest(scan_id)
        for name in REPORT_NAMES:
            if name in manifest:
                return self._object(manifest[name]), name
        raise ScanNotFound(f"the evidence bundle of scan {scan_id} holds no report")

    def evidence_object(self, scan_id: str, name: str) -> bytes:
        """An object of the scan's bundle by the name its manifest gives it (the frames
        and maps a report shows). Raises ScanNotFound, NotReady, EvidenceAltered."""
        manifest = self._manifest(scan_id)
        if name not in manifest:
            raise ScanNotFound(f"the evidence bundle of scan {scan_id} has no {name!r}")
        return self._object(manifest[name])

    def _manifest(self, scan_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            scan = self._scans.get(scan_id)
        if scan is None:
            raise ScanNotFound(f"no scan {scan_id}")
        if scan.status in ("queued", "running"):
            raise NotReady(f"scan {scan_id} is {scan.status}: its report is not written yet")
        if scan.manifest_key is None:
            raise ScanNotFound(
                f"scan {scan_id} ended in an error ({scan.reason}), so it has no report: "
                f"{scan.error}"
            )
        manifest = json.loads(self.evidence.get_bytes(scan.manifest_key))
        return {str(obj["name"]): obj for obj in manifest["objects"]}

    def _object(self, entry: dict[str, Any]) -> bytes:
        data = self.evidence.get_bytes(str(entry["key"]))
        if sha256_bytes(data) != entry["sha256"]:
            raise EvidenceAltered(f"evidence object {entry['name']} does not match its manifest")
        return data

    # -- callbacks ----------------------------------------------------------------------

    def _call_back(self, url: str, scan: Scan) -> None:
        """POST the scan record to `url`, signed as the alert sink signs
        (`X-Synthwatch-Timestamp`, `X-Synthwatch-Signature`), through the fetcher's SSRF
        guard (every connection vetted; redirects not followed). A few attempts; a
        failure is logged, never raised: the scan's outcome stands."""
        secret = self.settings.api.callback_secret
        assert secret is not None  # check_callback refused the scan otherwise
        body = json.dumps(scan.model_dump(mode="json"), sort_keys=True).encode()
        endpoint = shown_endpoint(url)
        fs = self.settings.fetch
        detail = ""
        with netguard.guarded_client(
            allow_private=fs.allow_private,
            allow_networks=fs.allow_networks,
            user_agent=fs.user_agent,
            timeout_s=CALLBACK_TIMEOUT_S,
            connect_timeout_s=min(fs.connect_timeout_s, CALLBACK_TIMEOUT_S),
        ) as client:
            for attempt in range(1, CALLBACK_ATTEMPTS + 1):
                timestamp = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: sign(secret.get_secret_value(), timestamp, body),
                    IDEMPOTENCY_HEADER: scan.id,
                    SCAN_ID_HEADER: scan.id,
                }
                try:
                    response = client.post(url, content=body, headers=headers)
                except RefusedAddress as exc:
                    detail = str(exc)
                    break  # the name now resolves to a refused address: never retried
                except httpx.HTTPError as exc:
                    detail = type(exc).__name__
                else:
                    status = response.status_code
                    if 200 <= status < 300:
                        log.info("callback delivered", scan_id=scan.id, endpoint=endpoint)
                        return
                    detail = f"HTTP {status}"
                    if not (status >= 500 or status in (408, 429)):
                        break
                if attempt < CALLBACK_ATTEMPTS:
                    time.sleep(backoff(attempt, 0.5, 5.0))
        log.warning("callback failed", scan_id=scan.id, endpoint=endpoint, detail=detail)
