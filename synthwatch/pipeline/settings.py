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

from synthwatch.operators.errors import ConfigError


def _default_model_dir() -> Path:
    return Path.home() / ".local" / "share" / "synthwatch" / "models"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FetchSettings(_Frozen):
    allow_private: bool = False
    """Allow loopback/private/link-local destinations. Only for trusted deployments and tests."""
    allow_networks: tuple[str, ...] = ()
    """CIDRs allowed although not public (e.g. an internal media server, `10.20.0.0/16`):
    narrower than `allow_private`, which opens every non-public range at once."""
    max_bytes: int = 512 * 1024 * 1024
    """Cap on decoded (not wire) body bytes."""
    timeout_s: float = 120.0
    """Cap on the whole transfer, redirects included."""
    connect_timeout_s: float = 10.0
    max_redirects: int = 5
    user_agent: str = "synthwatch/0.1 (+https://github.com/synthwatch/synthwatch)"


class SampleSettings(_Frozen):
    frames: int = Field(default=16, ge=1)
    """Frames per video item, spread evenly over the duration."""
    seconds_per_frame: float | None = None
    """If set, one frame every k seconds (capped by max_frames) instead of `frames` per item."""
    mode: Literal["exact", "keyframes", "adaptive"] = "adaptive"
    """adaptive (default): a keyframe for each target that has one of its own within half
    the target spacing (so every frame still lies in its target's slice of the duration),
    exact frames for the rest: keyframe-cheap on short GOPs, about exact seek's cost on
    long ones; 22x cheaper per frame than a full decode on a 1080p clip with a keyframe a
    second (benchmarks/bench_sampling.py). exact: seek or decode forward to each target
    time. keyframes: keyframes only, topped up with exact targets when they are too few.

    Exact was the default until it turned out that its better dev-set score was the face
    model recognising its own training frames: sbi_face was trained on the 16 evenly
    spaced frames that exact mode draws from the dev clips, and with 15 or 17 frames
    (frames it never saw) exact's raw video AUC fell from 0.865 to 0.73 and 0.69, as low
    as adaptive's 0.75 on the same 15 targets (docs/EVALUATION.md)."""
    max_frames: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=8192 * 8192, ge=1)
    """Decoded pixels per frame. A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale (up
    to 64x this); other formats over it are refused, as video frames are."""
    max_streams: int = Field(default=16, ge=1)
    max_duration_s: float = Field(default=4 * 3600.0, gt=0)
    """Only this much of a longer video is indexed and sampled (the verdict says so)."""
    max_decode_s: float = Field(default=60.0, gt=0)
    max_image_frames: int = Field(default=2000, ge=1)
    """Only this many frames of a longer animation are sampled (the verdict says so)."""
    audio: bool = True
    max_audio_s: float = Field(default=600.0, gt=0)
    """Only this much of a longer audio track is decoded (the verdict says so)."""
    isolate: bool = True
    """Decode in a child process (operators/sandbox.py) with the caps below and a hard
    deadline, so a decoder crash, hang or memory blow-up fails the item, not the worker.
    Off only to profile the decoder itself."""
    max_memory_mb: int = 2048
    """Address-space cap (RLIMIT_AS) of the decoding child, its ~300 MB of libraries
    included. Measured peaks: 64 frames of 1080p 0.7 GB; a still at `max_pixels` 0.9 GB
    (PNG) to 1.4 GB (WebP with alpha)."""


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
    """auto: MTCNN when its weights are installed, else the LBP cascade in scikit-image."""
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
    face_threshold: float = 0.9


class PolicySettings(_Frozen):
    version: str = "policy.v1"
    flag_threshold: float = Field(default=0.8, ge=0, le=1)
    review_threshold: float = Field(default=0.5, ge=0, le=1)
    alert_on: tuple[Literal["flag", "review", "inconclusive"], ...] = ("flag", "review")
    """Decisions that get an evidence bundle and an alert. Add `inconclusive` to have a
    person look at every item the detectors could not score."""


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


class SinkSettings(_Frozen):
    """The alert sink (`synthwatch worker --role sink`): reads `media.alerts` and POSTs
    each alert to a webhook (a SOAR, a ticketing system, Splunk's HTTP Event Collector)."""

    url: str | None = None
    """Where alerts are POSTed; the sink role refuses to start without it."""
    format: Literal["native", "ocsf", "splunk_hec"] = "ocsf"
    """native: the alert.v2 record; ocsf: an OCSF Detection Finding (class 2004);
    splunk_hec: an HEC event envelope around the OCSF finding."""
    secret: SecretStr | None = None
    """HMAC-SHA256 key for the signature header; unsigned when unset."""
    splunk_token: SecretStr | None = None
    """HEC token, sent as `Authorization: Splunk <token>` (splunk_hec only)."""
    splunk_index: str | None = None
    splunk_sourcetype: str = "synthwatch:alert"
    max_attempts: int = 6
    """Delivery attempts per alert before it is dead-lettered (reason `delivery`)."""
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 10.0


class TracingSettings(_Frozen):
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. `http://otel-collector:4318/v1/traces`); needs the
    `otlp` extra. Unset: trace context still propagates in Kafka headers and logs."""


class HealthSettings(_Frozen):
    stall_s: float = 600.0
    """Liveness fails when work is pending and no record has finished for this long."""


class S3Settings(_Frozen):
    endpoint_url: str | None = None
    region: str = "us-east-1"
    bucket: str = "synthwatch"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    blob_prefix: str = "blobs/sha256"
    evidence_prefix: str = "evidence"


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
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    sink: SinkSettings = SinkSettings()
    tracing: TracingSettings = TracingSettings()
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
