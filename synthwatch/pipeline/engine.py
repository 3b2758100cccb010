"""The scanning engine: the operators wired into one object both modes share.

Embedded mode (`synthwatch scan`) calls it directly; the streaming topology calls the
same methods from its agents, off the event loop. It owns the long-lived resources: the
model store, the face detector, the inference backend and the dynamic batcher, so
crops from concurrent items share batches.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt
import structlog
import torch
from PIL import Image

from synthwatch.models.mobilenet import scene_view
from synthwatch.models.registry import DEFAULT_CALIBRATION, ModelKind, ModelStore
from synthwatch.operators import audio as audio_op
from synthwatch.operators import calibrate as calibrate_op
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse, sandbox
from synthwatch.operators.alert import alert_id, make_alert
from synthwatch.operators.batcher import Batcher
from synthwatch.operators.calibrate import Calibration
from synthwatch.operators.errors import ModelUnavailable
from synthwatch.operators.evidence import Bundle, EvidenceFrame, write_bundle
from synthwatch.operators.faces import FaceFinder
from synthwatch.operators.fetch import Fetched
from synthwatch.operators.infer import InferenceBackend, resolve_backend_name, select_backend
from synthwatch.operators.netguard import redact_url
from synthwatch.operators.policy import Policy
from synthwatch.operators.sample import Sampled
from synthwatch.operators.store import ObjectStore
from synthwatch.pipeline import metrics
from synthwatch.pipeline.explain import Explainer
from synthwatch.pipeline.settings import ModelSettings, Settings
from synthwatch.pipeline.signals import forensic_signals, provenance_signals
from synthwatch.schemas import (
    Alert,
    FaceBox,
    FrameResult,
    MediaType,
    Modality,
    Provenance,
    Segment,
    Signal,
    Verdict,
)

log = structlog.get_logger("synthwatch.engine")

CROP_SIZE = 256
"""Face crops are cut once at this size and resized to each face model's input."""
NO_FACE_NOTE = "no face found: the face models did not score this item"
INCONCLUSIVE_NOTE = (
    "inconclusive: no detector that applies to this item produced a score, so there is "
    "no synthetic score; this is not evidence of authenticity"
)
UNSCORED_NOTE = (
    "no detector produced a score: the decision was forced by a finding alone, and "
    "there is no synthetic score"
)
SOUNDTRACK_NOTE = (
    "soundtrack not scored: the speech models misread real video soundtracks (music and "
    "room sound under the speech) as synthetic, see docs/EVALUATION.md"
)


@dataclass(frozen=True)
class Item:
    """What the engine needs to know about one fetched item."""

    id: str
    url: str
    source: str
    submitted_at: float
    sha256: str
    media_type: MediaType
    path: Path
    blob: str
    mime: str = ""

    @classmethod
    def local(cls, fetched: Fetched, *, source: str) -> Item:
        """An item scanned in this process (embedded mode): its id is its hash, its
        blob the local file, and its URL shown without credentials or signatures."""
        return cls(
            id=fetched.sha256[:32],
            url=redact_url(fetched.url),
            source=source,
            submitted_at=time.time(),
            sha256=fetched.sha256,
            media_type=fetched.media_type,
            path=fetched.path,
            blob=str(fetched.path),
            mime=fetched.mime,
        )


@dataclass(frozen=True)
class Faces:
    """What the face models made of one item."""

    frames: list[FrameResult] = field(default_factory=list)
    """Frames with at least one face, with each face's box and scores."""
    signals: list[Signal] = field(default_factory=list)
    distinct: int = 0
    """Distinct faces, tracked across the sampled frames."""


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    sampled: Sampled


@dataclass
class Detector:
    """One loaded model: its backend behind its own batcher."""

    name: str
    kind: ModelKind
    version: str
    """`name@<weights sha256[:12]>`, the key calibrations are bound to."""
    input_shape: tuple[int, ...]
    weight: float
    batcher: Batcher
    backend: InferenceBackend
    view: Literal["patches", "scene"] = "patches"
    """How an image model sees a frame (`ModelSpec.view`)."""
    min_side: int = 0
    """The shortest side an input needs for this model to score it (0: any)."""

    def score(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.batcher.run(batch)

    def signal(self, score: float, modality: Modality, segments: list[Segment]) -> Signal:
        """This model's raw item-level signal (calibration comes later, in `fuse`)."""
        return Signal(
            name=self.name,
            model=self.version,
            score=round(score, 6),
            weight=self.weight,
            modality=modality,
            segments=segments,
        )


def to_batch(crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """uint8 HxWx3 RGB crops -> float32 NCHW in [0, 1], the layout every detector takes."""
    arr = np.stack(crops).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def resize_crops(crops: Sequence[npt.NDArray[np.uint8]], size: int) -> list[npt.NDArray[np.uint8]]:
    if not crops or crops[0].shape[0] == size:
        return list(crops)
    return [
        np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR))
        for c in crops
    ]


def patches(image: npt.NDArray[np.uint8], size: int, count: int) -> list[npt.NDArray[np.uint8]]:
    """Up to `count` non-overlapping `size` x `size` patches at native resolution, from a
    centred grid: never resized, because resizing erases the up-sampling traces the
    whole-image models look for. An image smaller than one patch gives its centre crop
    padded by reflection."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        padded = np.pad(
            image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect"
        )
        return [np.ascontiguousarray(padded[:size, :size])]
    rows, cols = h // size, w // size
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    centre_r, centre_c = (rows - 1) / 2, (cols - 1) / 2
    cells.sort(key=lambda rc: ((rc[0] - centre_r) ** 2 + (rc[1] - centre_c) ** 2, rc))
    y0, x0 = (h - rows * size) // 2, (w - cols * size) // 2
    return [
        np.ascontiguousarray(
            image[y0 + r * size : y0 + (r + 1) * size, x0 + c * size : x0 + (c + 1) * size]
        )
        for r, c in cells[: max(1, count)]
    ]


def load_face_detector(store: ModelStore, settings: ModelSettings) -> tuple[FaceFinder, str]:
    """(detector, name): MTCNN when asked for or installed, else the LBP cascade."""
    choice = settings.face_detector
    if choice == "mtcnn" or (choice == "auto" and store.available("mtcnn")):
        pnet, rnet, onet = store.resolve("mtcnn")
        return (
            faces_op.FaceDetector(
                pnet, rnet, onet, min_size=settings.face_min_size, threshold=settings.face_threshold
            ),
            "mtcnn",
        )
    cascade = faces_op.CascadeFaceDetector(
        min_size=settings.face_min_size, threads=settings.threads
    )
    return cascade, "lbp_cascade"


def load_calibration(settings: ModelSettings) -> tuple[Calibration, str]:
    """(calibration, sha256 of its file or "" for none). An explicitly configured file
    that cannot be read is an error; the shipped default is used when present."""
    path = settings.calibration
    if path is None:
        if not DEFAULT_CALIBRATION.is_file():
            return calibrate_op.EMPTY, ""
        path = DEFAULT_CALIBRATION
    cal = calibrate_op.load(path)
    return cal, hashlib.sha256(path.read_bytes()).hexdigest()


MODEL_LISTS: dict[ModelKind, str] = {
    "face": "face_models",
    "image": "image_models",
    "audio": "audio_models",
}
"""The setting that lists each kind's models (`SYNTHWATCH_MODELS__<NAME>`)."""


def setting_name(kind: ModelKind) -> str:
    return f"SYNTHWATCH_MODELS__{MODEL_LISTS[kind].upper()}"


class Engine:
    def __init__(self, settings: Settings, *, cache_dir: Path | None = None) -> None:
        """Load every configured model, or refuse to start.

        Raises `ModelUnavailable` naming each configured model that is unknown, listed
        under the wrong kind, or whose weights are missing or altered, with where they
        were looked for and how to fix it. With `models.allow_missing`, models whose
        weights are missing or altered are left out instead (`missing` says why, and
        the verdicts of the items they would have scored say so); an unknown name is a
        typo and is refused either way.
        """
        self.settings = settings
        torch.set_num_threads(max(1, settings.models.threads))
        self.models = ModelStore(settings.model_dir, cache_dir=cache_dir)
        ms = settings.models
        self.backend_name = resolve_backend_name(ms.backend)
        self.missing: dict[str, tuple[ModelKind, str]] = {}
        """Listed models left out under `allow_missing`: name -> (kind, why)."""
        self.detectors: list[Detector] = []
        self.faces: FaceFinder | None = None
        self.face_detector_name = ""
        try:
            self._check_lists()
            # Every listed model's weights are verified before any is loaded, so a
            # missing one is reported in a moment, not after the others' sessions.
            present = [
                (name, kind)
                for kind, listing in MODEL_LISTS.items()
                for name in getattr(ms, listing)
                if self._present(name, kind)
            ]
            for name, kind in present:
                self._load(name, kind)
            if not self.detectors:
                raise ModelUnavailable(
                    "no detector could be loaded: "
                    + "; ".join(why for _kind, why in self.missing.values())
                )
            if self.by_kind("face"):
                self.faces, self.face_detector_name = load_face_detector(self.models, ms)
        except BaseException:
            self.close()
            raise
        for name, (_kind, why) in self.missing.items():
            log.warning("model left out", model=name, reason=why)
        self.calibration, cal_sha = load_calibration(ms)
        self.policy = build_policy(settings)
        loaded = [d.name for d in self.detectors]
        if self.face_detector_name == "mtcnn":
            loaded.append("mtcnn")
        h = hashlib.sha256(self.models.model_set_version(loaded).encode())
        h.update(f"|{self.face_detector_name}|calibration={cal_sha}".encode())
        self.model_set = h.hexdigest()[:16]
        self._explainer: Explainer | None = None

    def _check_lists(self) -> None:
        """Every listed name must be a registered model of the list's kind: a typo
        would otherwise drop a detector without a word."""
        problems = []
        known = {spec.name: spec.kind for spec in self.models.specs}
        for kind, listing in MODEL_LISTS.items():
            for name in getattr(self.settings.models, listing):
                if known.get(name) == kind:
                    continue
                if name in known:
                    problems.append(
                        f"{name!r} in {setting_name(kind)} is a {known[name]} model; "
                        f"list it in {setting_name(known[name])}"
                        if known[name] in MODEL_LISTS
                        else f"{name!r} in {setting_name(kind)} is a {known[name]}, not a detector"
                    )
                    continue
                same_kind = [n for n, k in known.items() if k == kind]
                close = difflib.get_close_matches(name, same_kind, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(
                    f"unknown model {name!r} in {setting_name(kind)}: {hint}"
                    f"known {kind} models: {', '.join(same_kind)}"
                )
        if problems:
            raise ModelUnavailable("; ".join(problems))

    def _present(self, name: str, kind: ModelKind) -> bool:
        """Whether `name`'s weights are in place and intact; raises `ModelUnavailable`
        when they are not, unless `allow_missing` (then False, and `missing` says why)."""
        try:
            self.models.resolve(name)
        except ModelUnavailable as exc:
            if not self.settings.models.allow_missing:
                raise ModelUnavailable(
                    f"{exc} (listed in {setting_name(kind)}; if the weights are "
                    "elsewhere, set SYNTHWATCH_MODEL_DIR; to scan without this model, "
                    "pass --allow-missing-models)"
                ) from None
            self.missing[name] = (kind, str(exc))
            return False
        return True

    def _load(self, name: str, kind: ModelKind) -> None:
        ms = self.settings.models
        spec = self.models.spec(name)
        max_batch = min(ms.max_batch, ms.audio_max_batch) if kind == "audio" else ms.max_batch
        backend = select_backend(
            ms.backend,
            onnx_path=lambda: self.models.onnx_path(name),
            torch_module=lambda: self.models.load_torch(name),
            threads=ms.threads,
            max_batch=max_batch,
            engine_cache_dir=self.models.cache_dir / "tensorrt",
            # Audio models a window at a time: same speed, a third of the peak memory.
            rows_per_run=1 if kind == "audio" else 0,
        )
        weights_id = self.models.weights_id(name)
        version = f"{name}@{weights_id[:12]}"
        metrics.MODEL_INFO.labels(name, version, weights_id, backend.name).set(1)
        self.detectors.append(
            Detector(
                name=name,
                kind=kind,
                version=version,
                input_shape=spec.input_shape,
                weight=ms.weights.get(name, 1.0),
                view=spec.view,
                min_side=spec.min_side,
                backend=backend,
                batcher=Batcher(
                    backend.run,
                    max_batch=max_batch,
                    max_delay_ms=ms.max_delay_ms,
                    on_batch=metrics.batch_observer(name, backend.name, max_batch),
                    name=f"batcher-{name}",
                ),
            )
        )

    def by_kind(self, kind: ModelKind) -> list[Detector]:
        return [d for d in self.detectors if d.kind == kind]

    def close(self) -> None:
        for d in self.detectors:
            d.batcher.close()
            d.backend.close()
        self.detectors = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def explainer(self) -> Explainer:
        """Grad-CAM and forensic maps for evidence; torch modules load on first use."""
        if self._explainer is None:
            self._explainer = Explainer(self.settings, self.models)
        return self._explainer

    # -- analysis ---------------------------------------------------------------------

    def analyze(self, item: Item) -> Analysis:
        """Sample; score faces, whole images and audio; read provenance; fuse; decide."""
        ms = self.settings.models
        t0 = time.perf_counter()
        sampled = sandbox.sample(item.path, self.settings.sample, media_type=item.media_type)
        metrics.DECODE_SECONDS.labels(sampled.media_type).observe(time.perf_counter() - t0)
        signals: list[Signal] = []
        notes: list[str] = list(sampled.notes)
        provenance: Provenance | None = None
        if ms.provenance:
            provenance, prov_signals, prov_notes = provenance_signals(item.path, item.mime)
            signals += prov_signals
            notes += prov_notes
        faces = Faces()
        if self.by_kind("face") and sampled.frames:
            faces = self._score_faces(sampled)
            signals += faces.signals
            if not faces.frames:
                notes.append(NO_FACE_NOTE)
        image_frames: list[FrameResult] = []
        if (
            self.by_kind("image")
            and sampled.frames
            and (sampled.media_type == "image" or ms.image_on_video)
        ):
            image_frames, image_signals, image_notes = self._score_images(sampled)
            signals += image_signals
            notes += image_notes
        if ms.forensics and sampled.media_type == "image" and sampled.frames:
            signals += forensic_signals(item.path, sampled.frames[0].image)
        if sampled.audio is not None:
            if sampled.media_type != "audio" and not ms.audio_on_video:
                notes.append(SOUNDTRACK_NOTE)
            elif self.by_kind("audio"):
                # Windows end where the decoded audio does (max_audio_s may cut it).
                heard = len(sampled.audio) / audio_op.SAMPLE_RATE
                span = min(sampled.duration_s, heard) if heard else sampled.duration_s
                signals += self._score_audio(sampled.audio, span)
            elif not any(kind == "audio" for kind, _why in self.missing.values()):
                notes.append(f"audio decoded, but {setting_name('audio')} lists no model")
        notes += self._missing_notes(sampled)
        signals = fuse.calibrate(signals, self.calibration)
        fused = fuse.combine(signals, prior=self.calibration.prior)
        decision = self.policy.decide(fused.score, minimum=fused.minimum)
        if fused.score is None:
            notes.append(INCONCLUSIVE_NOTE if decision == "inconclusive" else UNSCORED_NOTE)
        frames = merge_frames(faces.frames, image_frames, signals, self.calibration)
        top = max(
            (s for s in signals if s.name in fused.decided_by),
            key=lambda s: s.score,
            default=None,
        )
        verdict = Verdict(
            id=item.id,
            url=item.url,
            source=item.source,
            submitted_at=item.submitted_at,
            sha256=item.sha256,
            media_type=sampled.media_type,
            synthetic_score=None if fused.score is None else round(fused.score, 6),
            decision=decision,
            signals=signals,
            segments=list(top.segments) if top is not None else [],
            frames=frames,
            duration_s=round(sampled.duration_s, 3),
            faces_found=faces.distinct,
            face_detections=sum(len(f.faces) for f in faces.frames),
            has_audio=sampled.audio is not None,
            model_set=self.model_set,
            policy_version=self.policy.version,
            blob=item.blob,
            notes=notes,
            decided_by=fused.decided_by,
            provenance=provenance,
            detected_at=round(time.time(), 3),
        )
        return Analysis(verdict=verdict, sampled=sampled)

    def _missing_notes(self, sampled: Sampled) -> list[str]:
        """One note per listed model that was left out (`allow_missing`) and would have
        read this item."""
        ms = self.settings.models
        notes = []
        for name, (kind, why) in self.missing.items():
            applies = (
                bool(sampled.frames)
                if kind == "face"
                else bool(sampled.frames) and (sampled.media_type == "image" or ms.image_on_video)
                if kind == "image"
                else sampled.audio is not None
                and (sampled.media_type == "audio" or ms.audio_on_video)
            )
            if applies:
                notes.append(f"{name} did not run: {why}")
        return notes

    def _score_faces(self, sampled: Sampled) -> Faces:
        """Per-frame face results, one signal per face model (frames with a face only),
        and the number of distinct faces."""
        assert self.faces is not None
        images = [f.image for f in sampled.frames]
        detections = self.faces.detect(images)
        per_frame = [
            faces_op.crop_faces(
                img,
                dets,
                scale=1.3,
                size=CROP_SIZE,
                min_confidence=self.settings.models.face_threshold,
            )
            for img, dets in zip(images, detections, strict=True)
        ]
        crops = [c.image for fc in per_frame for c in fc]
        if not crops:
            return Faces()
        face_ids = faces_op.track_faces([[c.box for c in fc] for fc in per_frame])
        models = self.by_kind("face")
        raw = {d.name: d.score(to_batch(resize_crops(crops, d.input_shape[-1]))) for d in models}
        frames: list[FrameResult] = []
        times: list[float] = []
        per_model_frame: dict[str, list[float]] = {d.name: [] for d in models}
        pos = 0
        for frame, fcs, ids in zip(sampled.frames, per_frame, face_ids, strict=True):
            if not fcs:
                continue
            boxes = []
            for i, c in enumerate(fcs):
                crop_scores = {name: float(v[pos + i]) for name, v in raw.items()}
                boxes.append(
                    FaceBox(
                        x0=c.box[0],
                        y0=c.box[1],
                        x1=c.box[2],
                        y1=c.box[3],
                        confidence=round(c.confidence, 4),
                        score=round(self._fused_crop(models, crop_scores), 6),
                        scores={k: round(v, 6) for k, v in crop_scores.items()},
                        face=ids[i],
                    )
                )
            for d in models:
                per_model_frame[d.name].append(float(raw[d.name][pos : pos + len(fcs)].max()))
            pos += len(fcs)
            times.append(frame.time_s)
            frames.append(
                FrameResult(
                    index=frame.index,
                    time_s=round(frame.time_s, 3),
                    score=max(b.score for b in boxes),
                    region="faces",
                    faces=boxes,
                )
            )
        signals = []
        for d in models:
            score, segments = fuse.aggregate_scores(
                times, per_model_frame[d.name], _scored_span(sampled)
            )
            signals.append(d.signal(score, "face", segments))
        distinct = len({i for ids in face_ids for i in ids})
        return Faces(frames=frames, signals=signals, distinct=distinct)

    def _fused_crop(self, models: Sequence[Detector], crop_scores: dict[str, float]) -> float:
        total = sum(d.weight for d in models) or 1.0
        acc = 0.0
        for d in models:
            cal = self.calibration.get(d.name, d.version)
            v = crop_scores[d.name]
            acc += d.weight * (cal.apply(v) if cal is not None else v)
        return acc / total

    def _score_images(self, sampled: Sampled) -> tuple[list[FrameResult], list[Signal], list[str]]:
        """Whole-image models: patch models over native-resolution patches of every
        sampled frame; scene models over a still's centre square at one geometry, where
        the still is as large as they were trained on (else they abstain, with a note)."""
        count = self.settings.models.image_patches
        frames: list[FrameResult] = []
        signals: list[Signal] = []
        notes: list[str] = []
        for d in self.by_kind("image"):
            if d.view == "scene":
                if sampled.media_type != "image":
                    continue  # video frames are outside what a scene model was trained on
                if min(sampled.width, sampled.height) < d.min_side:
                    notes.append(
                        f"{d.name} did not score: the image is {sampled.width}x"
                        f"{sampled.height}, under the {d.min_side} px it was trained on"
                    )
                    continue
                views = [scene_view(f.image, d.input_shape[-1]) for f in sampled.frames]
                per_frame = [float(v) for v in d.score(to_batch(views))]
            else:
                size = d.input_shape[-1]
                cut = [patches(f.image, size, count) for f in sampled.frames]
                scores = d.score(to_batch([p for ps in cut for p in ps]))
                per_frame, pos = [], 0
                for ps in cut:
                    per_frame.append(float(scores[pos : pos + len(ps)].mean()))
                    pos += len(ps)
            times = [f.time_s for f in sampled.frames]
            score, segments = fuse.aggregate_scores(times, per_frame, _scored_span(sampled))
            signals.append(d.signal(score, "image", segments))
            if not frames:  # the first image model's timeline is the one shown per frame
                frames = [
                    FrameResult(
                        index=f.index, time_s=round(f.time_s, 3), score=round(v, 6), region="frame"
                    )
                    for f, v in zip(sampled.frames, per_frame, strict=True)
                ]
        return frames, signals, notes

    def _score_audio(self, audio: npt.NDArray[np.float32], duration_s: float) -> list[Signal]:
        signals = []
        for d in self.by_kind("audio"):
            batch, starts = audio_op.windows(
                audio, size=d.input_shape[-1], max_windows=self.settings.models.audio_windows
            )
            scores = d.score(np.ascontiguousarray(batch, dtype=np.float32))
            # Segments: the top quarter of windows, as for frames. Score: the mean over
            # windows, not the top-k mean. AASIST (trained on ASVspoof 2019 LA studio
            # speech) puts single windows of real speech from public videos above 0.9;
            # the mean separated the dev set's real and cloned voices widest.
            _, segments = fuse.aggregate_scores(starts, [float(v) for v in scores], duration_s)
            score = float(np.mean(scores))
            signals.append(d.signal(score, "audio", segments))
        return signals


def _scored_span(sampled: Sampled) -> float:
    """How much of the item the frame scores stand for: all of it, unless a cap cut
    sampling short (then the segments end where sampling did)."""
    return sampled.sampled_s if sampled.sampled_s is not None else sampled.duration_s


def merge_frames(
    face_frames: Sequence[FrameResult],
    image_frames: Sequence[FrameResult],
    signals: Sequence[Signal],
    calibration: Calibration,
) -> list[FrameResult]:
    """One timeline: a frame with faces shows its faces, any other its whole-image score.

    Whole-image frame scores are calibrated with the first image model's calibrator, so
    every score on the timeline is on the scale the policy thresholds use.
    """
    first_image = next((s for s in signals if s.modality == "image" and fuse.fused(s)), None)
    cal = calibration.get(first_image.name, first_image.model) if first_image else None
    with_faces = {f.index for f in face_frames}
    out = list(face_frames)
    for f in image_frames:
        if f.index in with_faces:
            continue
        out.append(
            f if cal is None else msgspec.structs.replace(f, score=round(cal.apply(f.score), 6))
        )
    return sorted(out, key=lambda f: f.time_s)


def build_policy(settings: Settings) -> Policy:
    pol = settings.policy
    return Policy(
        version=pol.version,
        flag_threshold=pol.flag_threshold,
        review_threshold=pol.review_threshold,
        alert_on=frozenset(pol.alert_on),
    )


def decide(
    verdict: Verdict,
    frames: Callable[[], Sequence[EvidenceFrame]],
    store: ObjectStore,
    *,
    evidence_prefix: str,
    policy: Policy,
) -> tuple[Alert, Bundle] | None:
    """For an alerting decision: write the evidence bundle, then build the alert.

    `frames` is called only if the bundle is not in the store yet.
    """
    if not policy.alerts(verdict.decision):
        return None
    aid = alert_id(verdict.sha256, verdict.model_set, verdict.policy_version)
    bundle = write_bundle(
        store, prefix=evidence_prefix, alert_id=aid, verdict=verdict, frames=frames
    )
    alert = make_alert(
        verdict, evidence_uri=bundle.manifest_uri, manifest_sha256=bundle.manifest_sha256
    )
    return alert, bundle


def sampled_evidence(engine: Engine, analysis: Analysis, path: Path) -> list[EvidenceFrame]:
    """Evidence frames from the frames `scan` already decoded, with their explanations."""
    decoded = [EvidenceFrame(time_s=f.time_s, image=f.image) for f in analysis.sampled.frames]
    return engine.explainer.evidence(analysis.verdict, decoded, path)
