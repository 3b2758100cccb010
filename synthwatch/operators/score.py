"""The scoring steps: loaded detectors applied to a sampled item, as plain functions.

Each step takes the sampled item and the detectors of one kind and returns a `Scored`:
the raw item-level signals (calibration comes later, in `fuse`), notes for the verdict,
and the per-frame timeline it produced. `Engine.analyze` (pipeline/engine.py) decides
which steps apply to an item and runs them in order; nothing here knows about settings
objects, streams or the model store.

- faces: detect, crop once at `CROP_SIZE`, resize to each face model's input, score,
  track faces across frames;
- whole images: native-resolution patches (`patches`) or a scene model's one geometry;
- audio: fixed-length windows;
- `merge_frames`: one timeline per item from the face and whole-image frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt
from PIL import Image

from synthwatch.models.inputs import scene_view
from synthwatch.models.registry import ModelKind
from synthwatch.operators import audio as audio_op
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse
from synthwatch.operators.batcher import Batcher
from synthwatch.operators.calibrate import Calibration
from synthwatch.operators.faces import FaceFinder
from synthwatch.operators.infer import InferenceBackend
from synthwatch.operators.sample import Sampled
from synthwatch.schemas import FaceBox, FrameResult, Modality, Segment, Signal

CROP_SIZE = 256
"""Face crops are cut once at this size and resized to each face model's input."""
CROP_SCALE = 1.3
"""Face crops span this multiple of the detector's box (the face and its boundary)."""
NO_FACE_NOTE = "no face found: the face models did not score this item"

U8 = npt.NDArray[np.uint8]


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


@dataclass(frozen=True)
class Scored:
    """What one scoring step made of an item."""

    signals: list[Signal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    frames: list[FrameResult] = field(default_factory=list)
    """The step's timeline: frames with faces (face step) or every frame (image step)."""
    distinct_faces: int = 0
    """Faces tracked across the sampled frames (face step only)."""
    face_detections: int = 0


def to_batch(crops: Sequence[U8]) -> npt.NDArray[np.float32]:
    """uint8 HxWx3 RGB crops -> float32 NCHW in [0, 1], the layout every detector takes."""
    arr = np.stack(crops).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def resize_crops(crops: Sequence[U8], size: int) -> list[U8]:
    if not crops or crops[0].shape[0] == size:
        return list(crops)
    return [
        np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR))
        for c in crops
    ]


def patches(image: U8, size: int, count: int) -> list[U8]:
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


def scored_span(sampled: Sampled) -> float:
    """How much of the item the frame scores stand for: all of it, unless a cap cut
    sampling short (then the segments end where sampling did)."""
    return sampled.sampled_s if sampled.sampled_s is not None else sampled.duration_s


def fused_crop(
    models: Sequence[Detector], crop_scores: dict[str, float], calibration: Calibration
) -> float:
    """One face's score on the policy's scale: the weighted mean of each face model's
    calibrated score."""
    total = sum(d.weight for d in models) or 1.0
    acc = 0.0
    for d in models:
        cal = calibration.get(d.name, d.version)
        v = crop_scores[d.name]
        acc += d.weight * (cal.apply(v) if cal is not None else v)
    return acc / total


def score_faces(
    sampled: Sampled,
    finder: FaceFinder,
    models: Sequence[Detector],
    calibration: Calibration,
    *,
    min_confidence: float,
) -> Scored:
    """Per-frame face results (frames with a face only), one signal per face model, and
    the number of distinct faces; a note when no frame has a face."""
    images = [f.image for f in sampled.frames]
    detections = finder.detect(images)
    per_frame = [
        faces_op.crop_faces(
            img, dets, scale=CROP_SCALE, size=CROP_SIZE, min_confidence=min_confidence
        )
        for img, dets in zip(images, detections, strict=True)
    ]
    crops = [c.image for fc in per_frame for c in fc]
    if not crops:
        return Scored(notes=[NO_FACE_NOTE])
    face_ids = faces_op.track_faces([[c.box for c in fc] for fc in per_frame])
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
                    score=round(fused_crop(models, crop_scores, calibration), 6),
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
            times, per_model_frame[d.name], scored_span(sampled)
        )
        signals.append(d.signal(score, "face", segments))
    return Scored(
        signals=signals,
        frames=frames,
        distinct_faces=len({i for ids in face_ids for i in ids}),
        face_detections=sum(len(f.faces) for f in frames),
    )


def score_images(sampled: Sampled, models: Sequence[Detector], *, patches_per_frame: int) -> Scored:
    """Whole-image models: patch models over native-resolution patches of every sampled
    frame; scene models over a still's centre square at one geometry, where the still is
    as large as they were trained on (else they abstain, with a note). The first model
    that scores gives the per-frame timeline."""
    frames: list[FrameResult] = []
    signals: list[Signal] = []
    notes: list[str] = []
    for d in models:
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
            cut = [patches(f.image, size, patches_per_frame) for f in sampled.frames]
            scores = d.score(to_batch([p for ps in cut for p in ps]))
            per_frame, pos = [], 0
            for ps in cut:
                per_frame.append(float(scores[pos : pos + len(ps)].mean()))
                pos += len(ps)
        times = [f.time_s for f in sampled.frames]
        score, segments = fuse.aggregate_scores(times, per_frame, scored_span(sampled))
        signals.append(d.signal(score, "image", segments))
        if not frames:
            frames = [
                FrameResult(
                    index=f.index, time_s=round(f.time_s, 3), score=round(v, 6), region="frame"
                )
                for f, v in zip(sampled.frames, per_frame, strict=True)
            ]
    return Scored(signals=signals, notes=notes, frames=frames)


def score_audio(
    audio: npt.NDArray[np.float32],
    duration_s: float,
    models: Sequence[Detector],
    *,
    max_windows: int,
) -> Scored:
    """Each audio model over fixed-length windows spread across the track."""
    signals = []
    for d in models:
        batch, starts = audio_op.windows(audio, size=d.input_shape[-1], max_windows=max_windows)
        scores = d.score(np.ascontiguousarray(batch, dtype=np.float32))
        # Segments: the top quarter of windows, as for frames. Score: the mean over
        # windows, not the top-k mean. AASIST (trained on ASVspoof 2019 LA studio
        # speech) puts single windows of real speech from public videos above 0.9;
        # the mean separated the dev set's real and cloned voices widest.
        _, segments = fuse.aggregate_scores(starts, [float(v) for v in scores], duration_s)
        signals.append(d.signal(float(np.mean(scores)), "audio", segments))
    return Scored(signals=signals)


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
