"""One frozen settings object, built at the entry point and passed down explicitly.

Environment variables use the `SYNTHWATCH_` prefix and `__` for nesting, e.g.
`SYNTHWATCH_FETCH__ALLOW_PRIVATE=true`, `SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS=...`.
`SYNTHWATCH_MODEL_DIR` names the directory the model store reads weights from.
No other module reads the environment.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from synthwatch.errors import ConfigError
from synthwatch.operators.fetch import FetchSettings
from synthwatch.operators.matching import MatchingSettings
from synthwatch.operators.policy import PolicySettings
from synthwatch.operators.sample import SampleSettings
from synthwatch.operators.signing import SigningSettings
from synthwatch.operators.store import S3Settings
from synthwatch.operators.webhook import SinkSettings


def _default_model_dir() -> Path:
    return Path.home() / ".local" / "share" / "synthwatch" / "models"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(_Frozen):
    face_models: tuple[str, ...] = ("sbi_face",)
    """Registry names of the models that score face crops (`synthwatch models list`)."""
    image_models: tuple[str, ...] = ("scene_probe", "fingerprint")
    """Models that score whole images: `scene_probe` (stills of 512 px or more, at one
    geometry), `fingerprint` (native-resolution patches of stills and video frames). The
    first one that scores an item gives its per-frame timeline."""
    audio_models: tuple[str, ...] = ("aasist",)
    """Models that score 4 s windows of the audio track."""
    allow_missing: bool = False
    """Start although listed models' weights are missing or altered (`scan` and `worker`
    take `--allow-missing-models`): those models are left out, each verdict they would
    have read says so in its notes, and an item nothing else can score is
    `inconclusive`. Off: such a model stops `scan` and `worker` at start with one line
    naming it, where it was looked for and how to fix it. Unknown names always stop."""
    weights: dict[str, float] = {}
    """Fusion weight per model name inside its modality (default 1.0)."""
    calibration: Path | None = None
    """Calibration file from `synthwatch calibrate`; unset: the one shipped with synthwatch."""
    face_detector: Literal["auto", "mtcnn", "lbp_cascade"] = "auto"
    """auto: MTCNN when its weights are installed, else OpenCV's LBP cascade."""
    image_on_video: bool = True
    """Run the whole-image models on video frames too, with or without faces, so a fully
    generated video with no face is scored rather than left without a score."""
    image_patches: int = Field(default=8, ge=1)
    """Native-resolution patches per frame for the whole-image models."""
    provenance: bool = True
    """Read C2PA content credentials and generator metadata."""
    forensics: bool = True
    """Compute forensic maps (error level, residual spectrum) for still images."""
    audio_on_video: bool = False
    """Also run the audio models on video soundtracks. Off, and not recommended: AASIST
    models spoofed studio speech, and on the dev set's real clips (music and room sound
    under the speech) it scored 7 of 11 soundtracks above 0.99, so real clips flag
    (docs/EVALUATION.md, "Audio on video"). On audio-only items it separates real and
    cloned voices. Calibration fits audio models on audio-only items."""
    audio_max_batch: int = Field(default=8, ge=1)
    """Batch cap for the audio models. AASIST's first encoder blocks hold about 140 MB
    of activations per 4 s window: measured with ONNX Runtime on CPU, a batch of 8
    windows peaked at 2.3 GB RSS and a batch of 32 at 6.5 GB."""
    audio_windows: int = Field(default=32, ge=1)
    """At most this many 4 s windows per item, spread over the track."""
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    """`auto`: TensorRT on an NVIDIA GPU with the `tensorrt` package, torch on a GPU
    without it, ONNX Runtime on the CPU otherwise."""
    max_batch: int = Field(default=32, ge=1)
    max_delay_ms: float = Field(default=10.0, ge=0)
    threads: int = Field(default=2, ge=1)
    face_min_size: int = 40
    """Smallest face MTCNN looks for, in pixels of the frame it searches (below)."""
    face_threshold: float = 0.9
    face_detect_max_side: int = Field(default=1920, ge=64)
    """MTCNN searches frames shrunk to this long side; boxes are mapped back and face
    crops cut from the full frame. Smaller is faster (the cascade's cost is about
    proportional to the pixels searched) and misses small faces: the smallest face
    found in a frame of long side L is `face_min_size * L / face_detect_max_side`."""


class KafkaSettings(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    app_id: str = "synthwatch"
    partitions: int = 4
    replication_factor: int = 1
    topic_refs: str = "media.refs"
    topic_fetched: str = "media.fetched"
    topic_verdicts: str = "media.verdicts"
    topic_alerts: str = "media.alerts"
    topic_dlq: str = "media.dlq"
    topic_retry: str = "media.retry"
    """Records whose stage failed transiently, waiting for another attempt."""
    topic_hashlists: str = "media.hashlists"
    """Lists of known media, compacted: one record per entry keyed `<list>/<id>`, a
    tombstone for a removed one (`synthwatch hashes ... --cluster`). Every detect worker
    reads it whole, outside any consumer group (`pipeline/listfeed.py`)."""
    fetch_concurrency: int = Field(default=4, ge=1)
    """Downloads in flight per worker. Fetching waits on origins and the store, not the
    CPU: one at a time, a slow origin held up every ref behind it, and a burst of large
    files kept detect idle while they were copied into the store one by one."""
    detect_concurrency: int = Field(default=4, ge=1)
    handoff_max_bytes: int = Field(default=512 * 1024**2, ge=0)
    """`--role all` only: fetched media kept on local disk for this worker's own detect
    stage, so it does not read back from the store what it has just written (0: off).
    Files beyond this many bytes are dropped oldest first and read from the store."""
    session_timeout_s: float = 45.0
    """How long the group waits for a silent member (a killed worker) before handing its
    partitions to the others: Kafka's default; the broker allows 6 s to 1800 s."""
    group_instance_id: str | None = None
    """Static group membership (KIP-345): a stable name per worker, e.g. the pod name of
    a StatefulSet or Deployment. A restarted worker that rejoins within
    `session_timeout_s` gets its partitions back without a rebalance of the group."""
    max_poll_interval_s: float = 300.0
    """Broker-side limit between polls before the consumer is thrown out of its group.
    Work runs off the event loop, so polling goes on during a slow batch."""
    producer_request_timeout_s: float = Field(default=1200.0, gt=0)
    """How long one send waits for the broker before it fails (faust's default). A stage
    whose send fails keeps the record and sends again until the broker takes it."""


class RetrySettings(_Frozen):
    """Transient failures (HTTP 5xx and timeouts from the media's origin, S3 throttling):
    a few quick attempts in place, then the retry topic with growing delays, then the
    DLQ. Permanent failures (bad input, refused address) go to the DLQ at once."""

    inline_attempts: int = 3
    """Attempts in place, with capped exponential backoff and full jitter."""
    inline_backoff_s: float = 0.5
    inline_backoff_max_s: float = 5.0
    topic_attempts: int = 4
    """Further attempts through the retry topic before the record is dead-lettered."""
    topic_backoff_s: float = 10.0
    """Delay before the first retry-topic attempt; doubles per attempt, full jitter."""
    topic_backoff_max_s: float = 600.0
    outage_backoff_max_s: float = 30.0
    """While our own store is unreachable the stage pauses (it does not burn the record's
    attempts on our outage) and probes again at most this far apart."""
    dlq_limit_consecutive: int = Field(default=50, ge=0)
    """The DLQ guard (`routing.DlqLimit`): a stage that dead-letters this many records in
    a row for a reason that blames a deploy (a bug, unusable models or settings, records
    an upstream stage wrote wrongly, a sink refusing every alert) stops instead of
    draining its partitions into the DLQ; not ready, then not live. 0: no limit."""
    dlq_limit_ratio: float = Field(default=0.5, ge=0, le=1)
    """The guard also trips when more than this share of a stage's last
    `dlq_limit_window` records were dead-lettered that way. 0: no limit."""
    dlq_limit_window: int = Field(default=100, ge=1)


class TracingSettings(_Frozen):
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. `http://otel-collector:4318/v1/traces`); needs the
    `otlp` extra. Unset: trace context still propagates in Kafka headers and logs."""


class HealthSettings(_Frozen):
    stall_s: float = 600.0
    """Liveness fails when work is pending and no record has finished for this long."""


def _default_api_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "synthwatch" / "api"


class ApiSettings(_Frozen):
    """`synthwatch serve`: the HTTP API and its review page (`pipeline/api.py`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    mode: Literal["embedded", "cluster"] = "embedded"
    """embedded: the server runs each scan itself, with one long-lived engine. cluster:
    it hands each scan to the running pipeline (an upload is first stored in the bucket
    under `uploads/`), produces a MediaRef to the refs topic and follows the verdict,
    alert and dead-letter topics (`pipeline/cluster.py`); evidence bundles live in S3."""
    cluster_timeout_s: float = Field(default=3600.0, gt=0)
    """Cluster mode: a scan without a verdict or dead letter after this long ends in
    error (reason `timeout`)."""
    alert_wait_s: float = Field(default=120.0, gt=0)
    """Cluster mode: how long to wait, after an alerting verdict, for the decide stage's
    alert and its bundle before the server writes a bundle of its own (without frames)."""
    data_dir: Path = Field(default_factory=_default_api_data_dir)
    """Scan records (`scans/<id>.json`), the audit log (`audit.jsonl`), evidence bundles
    (`evidence/`) and uploads in progress (`uploads/`)."""
    keys: dict[str, SecretStr] = {}
    """Client name -> API key, e.g. `SYNTHWATCH_API__KEYS='{"newsdesk": "..."}'`; the
    name is who the audit log says acted. Keys are secrets: prefer `keys_file`."""
    keys_file: Path | None = None
    """A file of more keys: a JSON object (name -> key) or lines `name:key` (`#`
    comments). Read once at start."""
    max_upload_bytes: int = Field(default=512 * 1024**2, ge=1)
    """An upload over this many bytes is refused (413) while it streams in."""
    workers: int = Field(default=2, ge=1)
    """Scans analysed at once; the others wait in the queue."""
    callback_secret: SecretStr | None = None
    """HMAC-SHA256 key that signs callbacks (`X-Synthwatch-Signature`, as the alert
    sink signs); a scan may name a `callback_url` only when it is set."""
    session_ttl_s: float = Field(default=8 * 3600, gt=0)
    """How long a review-page login lasts."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SYNTHWATCH_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    model_dir: Path = Field(default_factory=_default_model_dir)
    work_dir: Path | None = None
    """Where fetched media is staged; a fresh temporary directory when unset."""
    fetch: FetchSettings = FetchSettings()
    sample: SampleSettings = SampleSettings()
    models: ModelSettings = ModelSettings()
    policy: PolicySettings = PolicySettings()
    matching: MatchingSettings = MatchingSettings()
    """Lists of known media and the thresholds of matching against them."""
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    signing: SigningSettings = SigningSettings()
    """The Ed25519 key that signs evidence manifests, and the keys `verify` trusts."""
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    sink: SinkSettings = SinkSettings()
    tracing: TracingSettings = TracingSettings()
    api: ApiSettings = ApiSettings()
    """`synthwatch serve`."""
    fault_points: tuple[str, ...] = ()
    """Fault injection for the fault suite (tests/faults), inert when empty: entries
    `<stage>.<point>=kill` (SIGKILL this process there) or `=sleep:<seconds>`, e.g.
    `decide.after_evidence=kill`. Never set in production."""
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    log_level: str = "INFO"
    log_json: bool | None = None
    """JSON logs; default: JSON when stderr is not a TTY."""


ENV_PREFIX = "SYNTHWATCH_"


def env_name(loc: tuple[str | int, ...]) -> str:
    """The environment variable that sets the setting at `loc`, e.g.
    ("models", "backend") -> SYNTHWATCH_MODELS__BACKEND."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc if isinstance(p, str))


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment. Raises `ConfigError` with one line naming the
    variable and what is wrong with it, never pydantic's multi-line report."""
    try:
        return Settings()
    except SettingsError as exc:
        raise ConfigError(
            _explain_parse_error(exc, os.environ if environ is None else environ)
        ) from None
    except ValidationError as exc:
        raise ConfigError(validation_line(exc, where=env_name)) from None


def validation_line(
    exc: ValidationError, *, where: typing.Callable[[tuple[str | int, ...]], str]
) -> str:
    """The first validation error as one line: where it was set, what is wrong, the value."""
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f"; and {len(exc.errors()) - 1} more" if len(exc.errors()) > 1 else ""
    return f"{where(loc)}: {first['msg']}{shown}{more}"


def _explain_parse_error(exc: SettingsError, environ: Mapping[str, str]) -> str:
    """pydantic-settings parses list, tuple, dict and nested values as JSON and says
    only which top-level field failed; find the variable whose value is not JSON."""
    for key, value in sorted(environ.items()):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        annotation = _annotation(key[len(ENV_PREFIX) :].lower().split("__"))
        if annotation is None or not _is_complex(annotation):
            continue
        try:
            json.loads(value)
        except ValueError:
            example = '\'["a", "b"]\'' if _is_sequence(annotation) else "'{\"a\": 1}'"
            return f"{key}={value!r} is not JSON: write it as JSON, e.g. {key}={example}"
    return f"settings from the environment do not parse: {exc}"


def _annotation(path: list[str]) -> Any:
    model: Any = Settings
    annotation: Any = None
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        model = annotation
    return annotation


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple, set, frozenset)


def _is_complex(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset, dict):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel | dict)
