"""The scanning engine: the operators wired into one object both modes share.

Embedded mode (`synthwatch scan`) calls it directly; the streaming topology calls the
same methods from its agents, off the event loop. It owns the long-lived resources: the
model store, the face detector, the inference backend and the dynamic batcher, so
crops from concurrent items share batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from synthwatch.models.registry import ModelStore
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse
from synthwatch.operators.alert import alert_id, make_alert
from synthwatch.operators.batcher import Batcher
from synthwatch.operators.evidence import Bundle, EvidenceFrame, driving_frames, write_bundle
from synthwatch.operators.infer import resolve_backend_name, select_backend
from synthwatch.operators.policy import Policy
from synthwatch.operators.sample import Sampled, frames_at, sample
from synthwatch.operators.store import ObjectStore
from synthwatch.pipeline import metrics
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import Alert, FaceBox, FrameResult, MediaType, Signal, Verdict

FACE_DETECTOR = "mtcnn"
CROP_SIZE = 256
NO_FACE_NOTE = "no face found: the face model scored whole frames, which it was not trained on"


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


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    sampled: Sampled


def to_batch(crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """uint8 HxWx3 RGB crops -> float32 NCHW in [0, 1], the layout every detector takes."""
    arr = np.stack(crops).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


class Engine:
    def __init__(self, settings: Settings, *, cache_dir: Path | None = None) -> None:
        self.settings = settings
        torch.set_num_threads(max(1, settings.models.threads))
        self.models = ModelStore(settings.model_dir, cache_dir=cache_dir)
        ms = settings.models
        self.face_model = ms.face_model
        # Resolve first: a missing or altered weights file is a clear error at start-up,
        # not on the first item.
        self.models.resolve(self.face_model)
        pnet, rnet, onet = self.models.resolve(FACE_DETECTOR)
        self.faces = faces_op.FaceDetector(
            pnet, rnet, onet, min_size=ms.face_min_size, threshold=ms.face_threshold
        )
        self.backend_name = resolve_backend_name(ms.backend)
        self.backend = select_backend(
            ms.backend,
            onnx_path=lambda: self.models.onnx_path(self.face_model),
            torch_module=lambda: self.models.load_torch(self.face_model),
            threads=ms.threads,
            max_batch=ms.max_batch,
            engine_cache_dir=self.models.cache_dir / "tensorrt",
        )
        self.batcher = Batcher(
            self.backend.run,
            max_batch=ms.max_batch,
            max_delay_ms=ms.max_delay_ms,
            on_batch=metrics.observe_batch,
            name=f"batcher-{self.face_model}",
        )
        self.policy = build_policy(settings)
        self.model_set = self.models.model_set_version([FACE_DETECTOR, self.face_model])
        face_sha = self.models.spec(self.face_model).files[0].sha256
        self.face_model_version = f"{self.face_model}@{face_sha[:12]}"

    def close(self) -> None:
        self.batcher.close()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def analyze(self, item: Item) -> Analysis:
        """Sample, find faces, score crops (batched with other items), fuse, decide."""
        sampled = sample(item.path, self.settings.sample, media_type=item.media_type)
        frames = self._score_frames(sampled)
        score, segments = fuse.aggregate(frames, sampled.duration_s)
        signals: list[Signal] = []
        notes: list[str] = []
        if frames:
            note = NO_FACE_NOTE if frames[0].region == "frame" else ""
            if note:
                notes.append(note)
            signals.append(
                Signal(
                    name=self.face_model,
                    model=self.face_model_version,
                    score=score,
                    weight=1.0,
                    note=note,
                )
            )
        if sampled.media_type == "audio" or sampled.audio is not None:
            notes.append("audio decoded (16 kHz mono); no audio detector is in this model set yet")
        if not frames:
            notes.append(
                "no frames were scored: the synthetic score is not evidence of authenticity"
            )
        verdict = Verdict(
            id=item.id,
            url=item.url,
            source=item.source,
            submitted_at=item.submitted_at,
            sha256=item.sha256,
            media_type=sampled.media_type,
            synthetic_score=round(score, 6),
            decision=self.policy.decide(score) if frames else "pass",
            signals=signals,
            segments=segments,
            frames=frames,
            duration_s=round(sampled.duration_s, 3),
            faces_found=sum(len(f.faces) for f in frames),
            has_audio=sampled.audio is not None,
            model_set=self.model_set,
            policy_version=self.policy.version,
            blob=item.blob,
            notes=notes,
        )
        return Analysis(verdict=verdict, sampled=sampled)

    def _score_frames(self, sampled: Sampled) -> list[FrameResult]:
        """Face crops when any sampled frame has a face, else whole frames (region `frame`)."""
        if not sampled.frames:
            return []
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
        if any(per_frame):
            crops = [c.image for fc in per_frame for c in fc]
            scores = self.batcher.run(to_batch(crops))
            out, pos = [], 0
            for frame, fcs in zip(sampled.frames, per_frame, strict=True):
                if not fcs:
                    continue  # frames without a face say nothing to a face model
                s = scores[pos : pos + len(fcs)]
                pos += len(fcs)
                boxes = [
                    FaceBox(
                        x0=c.box[0],
                        y0=c.box[1],
                        x1=c.box[2],
                        y1=c.box[3],
                        confidence=round(c.confidence, 4),
                        score=round(float(v), 6),
                    )
                    for c, v in zip(fcs, s, strict=True)
                ]
                out.append(
                    FrameResult(
                        index=frame.index,
                        time_s=round(frame.time_s, 3),
                        score=round(float(s.max()), 6),
                        region="faces",
                        faces=boxes,
                    )
                )
            return out
        crops = [faces_op.whole_frame_crop(img, size=CROP_SIZE) for img in images]
        scores = self.batcher.run(to_batch(crops))
        return [
            FrameResult(
                index=f.index, time_s=round(f.time_s, 3), score=round(float(v), 6), region="frame"
            )
            for f, v in zip(sampled.frames, scores, strict=True)
        ]


def build_policy(settings: Settings) -> Policy:
    pol = settings.policy
    return Policy(
        version=pol.version,
        flag_threshold=pol.flag_threshold,
        review_threshold=pol.review_threshold,
        alert_on=frozenset(pol.alert_on),
    )


def evidence_frames(verdict: Verdict, path: Path, settings: Settings) -> list[EvidenceFrame]:
    """Re-decode the frames that drove a verdict: the decide stage receives no pixels, and
    needs no detector to draw its evidence, only the media and the verdict's timeline."""
    times = [f.time_s for f in driving_frames(verdict)]
    if not times:
        return []
    return [
        EvidenceFrame(time_s=f.time_s, image=f.image)
        for f in frames_at(path, times, settings.sample)
    ]


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


def sampled_evidence(sampled: Sampled) -> list[EvidenceFrame]:
    return [EvidenceFrame(time_s=f.time_s, image=f.image) for f in sampled.frames]
