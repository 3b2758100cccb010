"""Wire records: frozen, version-tagged msgspec structs, JSON on every topic.

Each record carries a `type` tag (e.g. `"media_ref.v1"`), so a consumer can tell what it
was sent and a later version can live beside this one. Unknown fields are ignored so an
older worker reads a newer producer's records; a missing required field is a
`SchemaInvalid` error, which the topology turns into a DLQ record with reason `schema`.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec

from synthwatch.errors import SchemaInvalid

MediaType = Literal["video", "image", "audio"]
Decision = Literal["flag", "review", "pass", "inconclusive"]
"""`inconclusive`: no detector that applies to the item produced a score (no face and no
whole-image model, a track no loaded model reads, a required model missing). Its
`synthetic_score` is null: an unmeasured item must never read as a low score."""
Modality = Literal["face", "image", "audio", "provenance", "metadata"]
"""What a signal looked at: face crops, whole images (native-resolution patches or
forensic maps), 4 s audio windows, the item's provenance (C2PA content credentials, or
a match against lists of known media), generator metadata."""

# The length caps are not redundant: a regex `$` also matches before a final newline.
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$", max_length=64)]
"""A lowercase sha256 hex digest. Checked on decode because later stages build local
paths and object keys from it: a record saying `"../../etc/passwd"` is `SchemaInvalid`,
never a file name."""
AlertId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$", max_length=32)]
"""`alert_id`: 32 lowercase hex characters, the evidence bundle's directory name."""


class _Record(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    """Base of every wire record: frozen, keyword-only, tagged in the `type` field."""


class Rescan(msgspec.Struct, frozen=True, kw_only=True):
    """The marker of a re-scan (`synthwatch rescan`): what the item's earlier verdict
    said, carried from `media.refs` to the verdict, so the decide stage can tell a
    verdict that flipped and emit its alert again with the new decision."""

    run: str
    """The re-scan run this request belongs to."""
    previous_decision: Decision
    previous_score: float | None = None
    previous_model_set: str = ""
    previous_policy_version: str = ""
    previous_detected_at: float = 0.0


class MediaRef(_Record, tag="media_ref.v1", frozen=True, kw_only=True):
    """A request to scan one item. Keyed on the topic by `id`."""

    id: str
    url: str
    source: str = ""
    submitted_at: float = 0.0
    attempt: int = 0
    rescan: Rescan | None = None
    """Set when `synthwatch rescan` sent the item again; None for a first scan."""


class FetchedMedia(_Record, tag="fetched_media.v1", frozen=True, kw_only=True):
    """The item is downloaded, hashed and stored under its sha256."""

    id: str
    url: str
    source: str = ""
    submitted_at: float = 0.0
    sha256: Sha256
    size: int
    mime: str
    media_type: MediaType
    blob: str
    """Where the bytes are: an object key in the blob bucket, or a local path in embedded mode.
    Not constrained here (a local path may be anything); the store refuses, before any
    I/O, every key it would not have built itself (`store.check_key`)."""
    rescan: Rescan | None = None
    """Carried from the MediaRef."""


class FaceBox(msgspec.Struct, frozen=True, kw_only=True):
    x0: float
    y0: float
    x1: float
    y1: float
    confidence: float
    score: float
    """The face models' fused synthetic score for this crop."""
    scores: dict[str, float] = {}
    """Each face model's raw score for this crop, by signal name."""
    face: int | None = None
    """Which distinct face this box is (boxes tracked across frames share the number);
    None from a producer that predates tracking."""


class FrameResult(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    time_s: float
    score: float
    """The frame's synthetic score: the highest score among its crops."""
    region: Literal["faces", "frame"]
    """`faces` when crops came from detected faces, `frame` when no face was found."""
    faces: list[FaceBox] = []


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    start_s: float
    end_s: float
    score: float
    """The highest frame or window score in the stretch, on the same scale as its
    signal's `score`: calibrated when the signal is, so a segment reads the number the
    frame behind it shows (`fuse.calibrate`)."""
    raw_score: float | None = None
    """The same before calibration; None from a producer that predates calibrated
    segments (whose `score` is then the raw one)."""


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    """Stable signal name, e.g. `meso4_df`."""
    model: str
    """Model name and version, `meso4_df@<sha256 prefix>`."""
    score: float
    """Synthetic score in [0, 1] that entered fusion: calibrated when `calibrated`."""
    weight: float
    """Weight in its modality's fusion; 0 = reported, not fused (e.g. an uncalibrated
    forensic feature, which is not a probability)."""
    note: str = ""
    modality: Modality = "face"
    raw_score: float | None = None
    """The signal's own aggregated score before calibration."""
    calibrated: bool = False
    decides: Literal["", "flag", "review"] = ""
    """`flag`: this signal decides the verdict on its own (a valid C2PA manifest that
    declares generative AI); `review`: the decision is at least `review` (e.g. a C2PA
    manifest that fails validation)."""
    segments: list[Segment] = []
    """The time segments that drove this signal's aggregated score."""


HashAlgorithm = Literal["pdq", "vpdq"]
"""`pdq`: Meta's PDQ of a still or of one sampled frame. `vpdq`: one frame of a video's
vPDQ, the PDQ of the frame shown at each whole second (`operators/phash.py`)."""

PdqHex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$", max_length=64)]
"""A PDQ hash: 64 lowercase hex digits, the first bit most significant (ThreatExchange's
form)."""


class MediaHash(msgspec.Struct, frozen=True, kw_only=True):
    """A perceptual hash of a still, of one sampled video frame (`pdq`), or of one
    frame of a video's vPDQ (`vpdq`, a frame a second) (`operators/phash.py`)."""

    algorithm: HashAlgorithm
    hash: PdqHex
    quality: int
    """0-100: under 50 the image has too little structure to match on."""
    time_s: float | None = None
    """The frame's time in a video; None for a still."""


class HashMatch(msgspec.Struct, frozen=True, kw_only=True):
    """The item matched an entry of a list of known media (`operators/matching.py`)."""

    list: str
    """The list's name, e.g. `afp-debunked`."""
    entry: str
    """The entry's id in its list (the exchange's id when imported from one)."""
    label: Literal["fake", "authentic"]
    """What the list says the entry is: a known fake, or a known authentic original."""
    algorithm: HashAlgorithm
    """How the entry is hashed: `pdq` (an image, or one frame) or `vpdq` (a video)."""
    distance: int
    """Bits (of 256) between the entry's hash and the nearest hash of the item; for a
    vPDQ entry, the largest such distance over the matched frames."""
    threshold: int
    """The most differing bits a match allows for this algorithm."""
    reference: str = ""
    """Where the entry's finding is told: a fact-check URL, a case id."""
    source: str = ""
    """Who listed the entry: the exchange, partner or desk it came from."""
    time_s: float | None = None
    """Where in the scanned video the nearest matching frame is (None for a still)."""
    entry_match_percent: float | None = None
    """vPDQ: the share of the entry's distinct frames found in the item."""
    item_match_percent: float | None = None
    """vPDQ: the share of the item's distinct frames found in the entry."""
    transform: str = ""
    """Set when the item matched only turned or flipped (`mirrored`, `turned upside
    down`, ...): how the item differs from the listed picture. PDQ entries only."""


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """C2PA content credentials as read offline (no remote manifests, no OCSP)."""

    present: bool
    valid: bool | None = None
    signer: str | None = None
    claim_generator: str | None = None
    ai_declared: bool = False
    digital_source_types: list[str] = []
    errors: list[str] = []


class Verdict(_Record, tag="verdict.v2", frozen=True, kw_only=True):
    """What the detect stage concluded about one item.

    v2 (from v1): `synthetic_score` may be null and `decision` may be `inconclusive`,
    for an item on which nothing was measured; `faces_found` counts distinct faces
    (tracked across frames), no longer detections; `face_detections` is new. A v1
    consumer validating `decision` against its three values or the score as a number
    would reject such a record, so the change is a new tag, not a silent widening;
    `decode` still reads `verdict.v1` records (a rolling upgrade's older producers).
    """

    id: str
    url: str
    source: str = ""
    submitted_at: float = 0.0
    sha256: Sha256
    media_type: MediaType
    synthetic_score: float | None
    """The fused score in [0, 1]; null when no detector produced one (`inconclusive`,
    or a decision forced by a finding alone, such as a C2PA manifest that fails
    validation on an item nothing else could score)."""
    decision: Decision
    signals: list[Signal]
    segments: list[Segment]
    frames: list[FrameResult]
    duration_s: float
    faces_found: int
    """Distinct faces: detections linked across the sampled frames count once."""
    face_detections: int = 0
    """Face boxes over all sampled frames (a face seen in 16 frames counts 16 times)."""
    has_audio: bool
    model_set: str
    policy_version: str
    blob: str
    notes: list[str] = []
    """What a reader must know to interpret the score, e.g. that no face was found."""
    decided_by: list[str] = []
    """Names of the signals that set the synthetic score (or decided the verdict)."""
    provenance: Provenance | None = None
    detected_at: float = 0.0
    """Unix time the verdict was made (0.0 from a producer that predates the field)."""
    hashes: list[MediaHash] = []
    """PDQ hashes of the still or of each sampled video frame, and a video's vPDQ
    frames; empty for audio, and from a producer that predates the field."""
    matches: list[HashMatch] = []
    """Entries of the loaded lists of known media that this item matched."""
    rescan: Rescan | None = None
    """Carried from the MediaRef: set when this verdict comes from a re-scan."""


class Alert(_Record, tag="alert.v2", frozen=True, kw_only=True):
    """An alerting decision, as it leaves for SOC tools and newsrooms.

    v2 (from v1): `synthetic_score` may be null and `decision` may be `inconclusive`
    (only where the policy's `alert_on` asks for inconclusive items); `decode` still
    reads `alert.v1` lines."""

    alert_id: AlertId
    """hash(media sha256, model set, policy version): a redelivery yields the same id."""
    id: str
    url: str
    source: str = ""
    sha256: Sha256
    media_type: MediaType
    synthetic_score: float | None
    """Null when no detector produced a score (see `Verdict.synthetic_score`)."""
    decision: Decision
    model_set: str
    policy_version: str
    evidence_uri: str
    """URI of the bundle's `manifest.json`."""
    manifest_sha256: Sha256
    segments: list[Segment]
    submitted_at: float = 0.0
    """Unix time the reference was submitted (0.0 when the producer did not say)."""
    detected_at: float = 0.0
    """Unix time the verdict was made: the finding's time in SIEM formats."""
    decided_by: list[str] = []
    """Names of the signals that set the synthetic score (or decided the verdict)."""
    rescan: Rescan | None = None
    """Set when a re-scan changed the item's decision: what it was before. Such an
    alert is emitted whatever the new decision, so a `pass` here withdraws an earlier
    finding."""
    matches: list[HashMatch] = []
    """The verdict's matches with lists of known media: the entry and its reference
    (a fact-check URL, a case id) an analyst follows up."""


class DeadLetter(_Record, tag="dead_letter.v1", frozen=True, kw_only=True):
    reason: str
    stage: Literal["fetch", "detect", "decide", "submit", "retry", "sink"]
    error: str
    attempt: int = 0
    id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    original: str = ""
    """The consumed record as text (undecodable bytes escaped), so it can be replayed.

    Kept verbatim, so it may carry what the producer put in the record, e.g. a presigned
    URL's signature: redacting it would make the record unreplayable. The DLQ topic is
    therefore as sensitive as `media.refs` (same ACLs, same retention); `original` is
    never logged, and `error` is the failure's one-line message, in which the operators
    show URLs only redacted."""
    failed_at: float = 0.0


RECORDS: tuple[type[_Record], ...] = (MediaRef, FetchedMedia, Verdict, Alert, DeadLetter)


class _VerdictV1(Verdict, tag="verdict.v1", frozen=True, kw_only=True):
    """A v1 verdict: every v1 value is a valid v2 value, only the tag differs."""


class _AlertV1(Alert, tag="alert.v1", frozen=True, kw_only=True):
    """A v1 alert: every v1 value is a valid v2 value, only the tag differs."""


_EARLIER: dict[type[_Record], type[_Record]] = {Verdict: _VerdictV1, Alert: _AlertV1}
"""Older tags each current record still reads, so a consumer upgraded first keeps
reading what not-yet-upgraded producers send during a rolling deploy."""

_encoder = msgspec.json.Encoder()


def encode(record: _Record) -> bytes:
    return _encoder.encode(record)


T = TypeVar("T", bound=_Record)


def decode(data: bytes | str | None, kind: type[T]) -> T:
    """Decode one record, or raise `SchemaInvalid` saying what is wrong."""
    if data is None:
        raise SchemaInvalid("null value")
    earlier = _EARLIER.get(kind)
    try:
        if earlier is None:
            return msgspec.json.decode(data, type=kind)
        record = msgspec.json.decode(data, type=kind | earlier)
    except msgspec.ValidationError as exc:
        raise SchemaInvalid(f"{kind.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SchemaInvalid(f"not JSON: {exc}") from None
    if type(record) is not kind:  # read as an earlier version: carry it as the current one
        record = kind(**msgspec.structs.asdict(record))
    assert isinstance(record, kind)
    return record


def to_builtins(record: msgspec.Struct) -> dict[str, object]:
    out = msgspec.to_builtins(record)
    assert isinstance(out, dict)
    return out
