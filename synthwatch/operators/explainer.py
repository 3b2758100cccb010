"""Evidence images that explain a verdict: Grad-CAM per flagged face or frame, forensic maps.

Used where the evidence bundle is written: `synthwatch scan` (from the frames it
already decoded) and the streaming `decide` stage (which re-decodes the few frames that
drove the verdict). The torch modules load on first use, so a decide worker that only
sees passing verdicts never loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.mobilenet import scene_view
from synthwatch.models.mtcnn import Detection
from synthwatch.models.registry import ModelStore
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse, gradcam, sandbox
from synthwatch.operators.evidence import EvidenceFrame, Overlay, closest, driving_frames
from synthwatch.operators.sample import SampleSettings
from synthwatch.operators.score import CROP_SCALE
from synthwatch.operators.signals.interpret import forensic_overlays
from synthwatch.schemas import FrameResult, Signal, Verdict

MAX_CAM_SIDE = 512
"""Whole-frame Grad-CAM runs on the centred native-resolution square of at most this
side: the whole-image models are fully convolutional and must not see resized pixels."""


def _top(signals: Sequence[Signal], modality: str) -> Signal | None:
    # Only models can be explained by Grad-CAM: forensic features are maps already.
    members = [
        s
        for s in signals
        if s.modality == modality and fuse.fused(s) and s.name not in fuse.NOT_PROBABILITIES
    ]
    return max(members, key=lambda s: s.score, default=None)


log = structlog.get_logger("synthwatch.explain")


class Explainer:
    """Draws the evidence images of a verdict with the weights in `store`.

    `review_threshold`: faces and frames scored under it get no heatmap. `forensics`:
    whether a still's first driving frame carries its forensic maps. `sample`: how
    `evidence_frames` re-decodes the driving frames.
    """

    def __init__(
        self,
        store: ModelStore,
        *,
        review_threshold: float,
        forensics: bool = True,
        sample: SampleSettings | None = None,
    ) -> None:
        self.store = store
        self.review_threshold = review_threshold
        self.forensics = forensics
        self.sample = sample or SampleSettings()
        self._modules: dict[str, nn.Module] = {}

    def explains(self, sig: Signal) -> bool:
        """Whether this process holds the very weights that scored `sig`.

        In streaming mode the heatmaps are drawn by `decide`, from its own model store,
        for a verdict `detect` made, possibly with other weights (a canary, a rolling
        upgrade). A heatmap from other weights, labelled with the verdict's model, would
        be false evidence, so a mismatch draws none (the frame is still saved)."""
        try:
            ours = f"{sig.name}@{self.store.weights_id(sig.name)[:12]}"
        except ModelUnavailable:
            ours = ""
        if ours != sig.model:
            log.warning(
                "no heatmap: the verdict's model is not the one loaded here",
                model=sig.model,
                loaded=ours or None,
            )
            return False
        return True

    def module(self, name: str) -> nn.Module:
        if name not in self._modules:
            self._modules[name] = self.store.load_torch(name)
        return self._modules[name]

    def overlays(
        self, verdict: Verdict, frame: FrameResult, image: npt.NDArray[np.uint8]
    ) -> list[Overlay]:
        """Grad-CAM of the signal that scored highest in the frame's modality: one per
        face at or above the review threshold, or one for the whole frame."""
        review = self.review_threshold
        out: list[Overlay] = []
        if frame.region == "faces":
            sig = _top(verdict.signals, "face")
            if sig is None or not self.explains(sig):
                return out
            size = self.store.spec(sig.name).input_shape[-1]
            for i, face in enumerate(frame.faces):
                if face.score < review:
                    continue
                det = Detection(face.x0, face.y0, face.x1, face.y1, face.confidence)
                crops = faces_op.crop_faces(
                    image, [det], scale=CROP_SCALE, size=size, min_confidence=0
                )
                if not crops:
                    continue
                crop = crops[0].image
                batch = crop.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
                heat = gradcam.grad_cam(self.module(sig.name), batch)[0]
                out.append(
                    Overlay(
                        name=f"heatmap_face{i}",
                        role="heatmap",
                        png=gradcam.png(gradcam.overlay(crop, heat)),
                        note=f"Grad-CAM of {sig.model} on face {i} (crop {CROP_SCALE}x the box)",
                    )
                )
            return out
        sig = _top(verdict.signals, "image")
        if sig is None or frame.score < review or not self.explains(sig):
            return out
        spec = self.store.spec(sig.name)
        h, w = image.shape[:2]
        if spec.view == "scene":
            # What the scene model saw: the centre square at its one geometry.
            square = scene_view(image, spec.input_shape[-1])
            where = f"centre square resized to {square.shape[0]}x{square.shape[1]}"
        else:
            side = min(h, w, MAX_CAM_SIDE)
            y0, x0 = (h - side) // 2, (w - side) // 2
            square = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
            where = f"centred {side}x{side} square at native resolution"
        batch = square.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
        heat = gradcam.grad_cam(self.module(sig.name), batch)[0]
        out.append(
            Overlay(
                name="heatmap_frame",
                role="heatmap",
                png=gradcam.png(gradcam.overlay(square, heat)),
                note=f"Grad-CAM of {sig.model}, {where}",
            )
        )
        return out

    def evidence(
        self,
        verdict: Verdict,
        decoded: Sequence[EvidenceFrame],
        path: Path | None,
    ) -> list[EvidenceFrame]:
        """The decoded driving frames with their explanations attached."""
        out: list[EvidenceFrame] = []
        first = True
        for fr in driving_frames(verdict):
            ev = closest(decoded, fr.time_s)
            if ev is None:
                continue
            overlays = self.overlays(verdict, fr, ev.image)
            if first and verdict.media_type == "image" and self.forensics:
                overlays += forensic_overlays(path, ev.image)
            first = False
            out.append(EvidenceFrame(time_s=fr.time_s, image=ev.image, overlays=tuple(overlays)))
        return out


def evidence_frames(verdict: Verdict, path: Path, explainer: Explainer) -> list[EvidenceFrame]:
    """Re-decode the frames that drove a verdict and explain them: the decide stage
    receives no pixels, only the media's location and the verdict's timeline."""
    times = [f.time_s for f in driving_frames(verdict)]
    if not times:
        return []
    decoded = [
        EvidenceFrame(time_s=f.time_s, image=f.image)
        for f in sandbox.frames_at(path, times, explainer.sample)
    ]
    return explainer.evidence(verdict, decoded, path)
