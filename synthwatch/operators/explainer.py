"""Evidence images that explain a verdict: a heatmap per flagged face or frame, forensic maps.

Used where the evidence bundle is written: `synthwatch scan` (from the frames it
already decoded) and the streaming `decide` stage (which re-decodes the few frames that
drove the verdict). The heatmaps come from forward passes of the scorer the caller hands
in (the backend that scored the item: ONNX Runtime in production), never from torch
autograd (`operators/heatmap.py`): an occlusion map for a face crop, a RISE map for a
scene model's view (one geometry, where a painted square is outside what it was trained
on), and for a patch model's frame an occlusion map that leaves each patch out of the
mean in turn. benchmarks/bench_heatmaps.py measured them against the Grad-CAM maps they
replace: on faces, hiding the top fifth of an occlusion map lowered sbi_face's score
more (median 0.26) than hiding the top fifth of a RISE map (0.14) or of Grad-CAM's
(0.17), at 0.4x RISE's cost, so the face maps show what moved the score.
Scorers are asked for on first use, so a decide worker that only sees passing verdicts
never loads a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from synthwatch.errors import ModelUnavailable
from synthwatch.models.inputs import scene_view
from synthwatch.models.mtcnn import Detection
from synthwatch.models.registry import ModelStore
from synthwatch.operators import faces as faces_op
from synthwatch.operators import fuse, heatmap, sandbox
from synthwatch.operators.evidence import EvidenceFrame, Overlay, closest, driving_frames
from synthwatch.operators.sample import SampleSettings
from synthwatch.operators.score import CROP_SCALE, patches
from synthwatch.operators.signals.interpret import forensic_overlays
from synthwatch.schemas import FrameResult, Signal, Verdict

MAX_MAP_SIDE = 512
"""A patch model's frame map covers the centred native-resolution square of at most this
side (a multiple of the model's patch): whole-image models must not see resized pixels."""


def _top(signals: Sequence[Signal], modality: str) -> Signal | None:
    # Only models get heatmaps: forensic features are maps already.
    members = [
        s
        for s in signals
        if s.modality == modality and fuse.fused(s) and s.name not in fuse.NOT_PROBABILITIES
    ]
    return max(members, key=lambda s: s.score, default=None)


log = structlog.get_logger("synthwatch.explain")


def _chw(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) in [0, 1], the layout the models take."""
    out: npt.NDArray[np.float32] = np.ascontiguousarray(
        image.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    )
    return out


def frame_view(
    image: npt.NDArray[np.uint8], size: int, view: str
) -> tuple[npt.NDArray[np.uint8], str, bool]:
    """What a whole-image model's frame map covers: (the square, a note saying where it
    came from, whether it is scored as the mean of its `size` x `size` patches).

    A scene model: the centre square at its one geometry. A patch model: the centred
    native-resolution square of at most `MAX_MAP_SIDE`, cut to a multiple of its patch,
    scored patch by patch as `score.score_images` scores a frame; a frame smaller than
    one patch: its centre crop padded by reflection, as `score.patches` cuts it."""
    h, w = image.shape[:2]
    if view == "scene":
        square = scene_view(image, size)
        return square, f"centre square resized to {square.shape[0]}x{square.shape[1]}", False
    if min(h, w) < size:
        where = f"the {w}x{h} image padded by reflection to one {size}x{size} patch"
        return patches(image, size, 1)[0], where, True
    side = min(h, w, max(MAX_MAP_SIDE, size)) // size * size
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
    where = (
        f"centred {side}x{side} square at native resolution, "
        f"each {size}x{size} patch left out of the mean in turn"
    )
    return square, where, True


class Explainer:
    """Draws the evidence images of a verdict with the weights in `store`.

    `scorer`: model name -> that model's batch scorer, (N, C, H, W) float32 in [0, 1]
    -> (N,) synthetic scores, from the same weights `store` holds (the engine's loaded
    backend). It is asked for once per model, on the first heatmap that model draws, and
    is only ever called with batches of the model's own `input_shape` (a patch model's
    frame square is scored patch by patch), so a fixed-shape ONNX export serves. It may
    be called from several threads at once. `review_threshold`: faces and frames scored
    under it get no heatmap. `forensics`: whether a still's first driving frame carries
    its forensic maps. `sample`: how `evidence_frames` re-decodes the driving frames.
    """

    def __init__(
        self,
        store: ModelStore,
        scorer: Callable[[str], heatmap.Scorer],
        *,
        review_threshold: float,
        forensics: bool = True,
        sample: SampleSettings | None = None,
    ) -> None:
        self.store = store
        self.review_threshold = review_threshold
        self.forensics = forensics
        self.sample = sample or SampleSettings()
        self._make_scorer = scorer
        self._scorers: dict[str, heatmap.Scorer] = {}
        self._lock = threading.Lock()

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

    def scorer(self, name: str) -> heatmap.Scorer:
        """The batch scorer of model `name`, made on first use and kept."""
        with self._lock:
            if name not in self._scorers:
                self._scorers[name] = self._make_scorer(name)
            return self._scorers[name]

    def overlays(
        self, verdict: Verdict, frame: FrameResult, image: npt.NDArray[np.uint8]
    ) -> list[Overlay]:
        """Heatmap of the signal that scored highest in the frame's modality: one per
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
                heat = heatmap.occlusion(self.scorer(sig.name), _chw(crop))
                out.append(
                    Overlay(
                        name=f"heatmap_face{i}",
                        role="heatmap",
                        png=heatmap.png(heatmap.overlay(crop, heat)),
                        note=(
                            f"occlusion map of {sig.model} on face {i} (crop {CROP_SCALE}x the box)"
                        ),
                    )
                )
            return out
        sig = _top(verdict.signals, "image")
        if sig is None or frame.score < review or not self.explains(sig):
            return out
        spec = self.store.spec(sig.name)
        size = spec.input_shape[-1]
        square, where, by_patch = frame_view(image, size, spec.view)
        x, score = _chw(square), self.scorer(sig.name)
        if by_patch:
            heat, method = heatmap.patch_occlusion(score, x, size), "occlusion map"
        else:
            heat, method = heatmap.rise(score, x), "RISE map"
        out.append(
            Overlay(
                name="heatmap_frame",
                role="heatmap",
                png=heatmap.png(heatmap.overlay(square, heat)),
                note=f"{method} of {sig.model}, {where}",
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
