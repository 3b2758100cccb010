"""MTCNN face detector: the three-stage cascade over P-Net, R-Net and O-Net, without torch.

The input normalisation, the stage thresholds, the 12-pixel P-Net cell with stride 2, the
box-regression scheme and the image-pyramid factor are the facts published by Zhang et al.
2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks"
(IEEE Signal Processing Letters 23(10)). The nets themselves are passed in as array
functions (`Net`): on the scan path ONNX Runtime sessions, in tests and for export the torch
modules of `synthwatch.models.mtcnn_nets`, so this module needs only numpy and OpenCV.

Boxes use continuous pixel coordinates: (x0, y0) is the top-left corner and (x1, y1) the
bottom-right one, so width = x1 - x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

Point = tuple[float, float]
Landmarks = tuple[Point, Point, Point, Point, Point]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

Net = Callable[[FloatArray], tuple[FloatArray, ...]]
"""One of the three nets as an array function: a normalised float32 (N, 3, H, W) batch in,
the torch module's outputs out as float32 arrays. P-Net: face probability (N, H', W') and
box offsets (N, 4, H', W'); R-Net: probability (N,) and offsets (N, 4); O-Net: probability
(N,), offsets (N, 4) and landmarks (N, 10), five x then five y fractions of the crop."""

# P-Net sees 12x12 windows and its one pooling layer halves the grid, so each output cell
# is a 12-pixel window placed every 2 pixels of the pyramid level.
_CELL = 12
_STRIDE = 2

# NMS overlaps of the reference cascade: 0.5 within one pyramid level, 0.7 across levels and
# after R-Net, 0.7 with the "min" overlap after O-Net (which also drops a small box nested
# inside a larger one, as a union overlap would not).
_NMS_LEVEL = 0.5
_NMS_ACROSS = 0.7
_NMS_FINAL = 0.7

# Cap on frames x pixels stacked into one pyramid pass. Measured on 2 CPU cores, stacking
# more than about two 1080p frames is slower per frame than running them apart (the
# arrays no longer fit the caches), while several small frames do gain a little.
_PIXEL_BUDGET = 2 * 1920 * 1080

# Frames whose long side exceeds this are shrunk before the cascade and the boxes mapped
# back: it bounds the integral image of an 8K still (800 MB at full size; at 1920 x 1920
# its int32 sums cannot overflow) and the time of the first pyramid level, at the price of
# fewer pixels for O-Net on the smallest faces.
_MAX_SIDE = 1920


@dataclass(frozen=True, slots=True)
class Detection:
    """One face: box corners in the frame's pixel coordinates, O-Net confidence, landmarks.

    The box may extend a little past the frame edges: it is the network's estimate of the
    face, not a crop. Landmarks are, in image terms, left eye, right eye, nose, left mouth
    corner, right mouth corner.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    confidence: float
    landmarks: Landmarks | None = None


def _normalise(pixels: FloatArray) -> FloatArray:
    """(N, H, W, 3) pixels to the nets' (N, 3, H, W) input.

    The nets were trained on (x - 127.5) / 128, which maps [0, 255] to about [-1, 1].
    """
    scaled = (pixels - np.float32(127.5)) * np.float32(1.0 / 128.0)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2), dtype=np.float32)


# Resizing is torch's "area" interpolation (adaptive average pooling), which the nets were
# run with until the cascade left torch: output cell i of n averages input cells
# floor(i * m / n) to ceil((i + 1) * m / n) - 1 of m, a partly covered edge cell counting
# in full. OpenCV's INTER_AREA weighs such cells by their coverage instead, a difference
# of about one grey level on average; on 14 frames of ../shared that moved 8 of 37 faces
# below an IoU of 0.9 with the torch cascade's boxes (one to 0.55) and one score by 0.14,
# so the windows are summed exactly here, from integral images.
Integral = npt.NDArray[np.int32 | np.float64]


def _integral(image: npt.NDArray[np.uint8] | FloatArray) -> Integral:
    """(H + 1, W + 1, C) sums of `image` (H, W, C) above and left of each corner.

    Exact: int32 for uint8 frames (a 1920 x 1920 frame sums to under 2**30 per channel),
    float64 for float levels.
    """
    sums: Integral
    if image.dtype == np.uint8:
        sums = np.asarray(cv2.integral(image, sdepth=cv2.CV_32S), dtype=np.int32)
    else:
        sums = np.asarray(cv2.integral(image, sdepth=cv2.CV_64F), dtype=np.float64)
    # OpenCV drops the channel axis of a one-channel image.
    return sums.reshape(image.shape[0] + 1, image.shape[1] + 1, -1)


def _windows(start: IntArray, length: IntArray, size: int) -> tuple[IntArray, IntArray]:
    """First and one-past-last input cell of each of `size` area cells over `length` cells
    from `start`: broadcast (K, 1) inputs give (K, size) outputs."""
    i = np.arange(size, dtype=np.int64)
    return start + i * length // size, start - (-(i + 1) * length // size)


def _area(integral: Integral, height: int, width: int) -> FloatArray:
    """The image of `integral` resized to (height, width, C) by area averaging."""
    zero = np.zeros(1, dtype=np.int64)
    y0, y1 = _windows(zero, np.array([integral.shape[0] - 1]), height)
    x0, x1 = _windows(zero, np.array([integral.shape[1] - 1]), width)
    # Rows first (whole rows, contiguous), then columns of the much smaller result.
    rows = np.take(integral, y1, axis=0) - np.take(integral, y0, axis=0)
    sums = np.take(rows, x1, axis=1) - np.take(rows, x0, axis=1)
    counts = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).astype(np.float32)
    level: FloatArray = sums.astype(np.float32) / counts[:, :, None]
    return level


def nms(
    boxes: npt.NDArray[np.floating],
    scores: npt.NDArray[np.floating],
    threshold: float,
    mode: Literal["union", "min"] = "union",
) -> IntArray:
    """Greedy non-maximum suppression; returns the kept indices, highest score first.

    A box is dropped when its overlap with a kept, higher-scoring box exceeds `threshold`.
    The overlap is intersection over union, or, with mode="min", intersection over the
    smaller area, which also removes a box lying inside a larger one.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x0, y0, x1, y1 = (boxes[:, k].astype(np.float64) for k in range(4))
    areas = np.maximum(x1 - x0, 0.0) * np.maximum(y1 - y0, 0.0)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        iw = np.maximum(np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]), 0.0)
        ih = np.maximum(np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]), 0.0)
        inter = iw * ih
        if mode == "min":
            denom = np.minimum(areas[best], areas[rest])
        else:
            denom = areas[best] + areas[rest] - inter
        overlap = inter / np.maximum(denom, 1e-12)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _batched_nms(
    boxes: FloatArray,
    scores: FloatArray,
    groups: IntArray,
    threshold: float,
    mode: Literal["union", "min"] = "union",
) -> IntArray:
    # Boxes of different frames never suppress each other.
    kept = [
        members[nms(boxes[members], scores[members], threshold, mode)]
        for members in (np.flatnonzero(groups == g) for g in np.unique(groups))
    ]
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _regress(boxes: FloatArray, offsets: FloatArray) -> FloatArray:
    # Offsets are fractions of the box's own width and height, one per edge.
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    h = (boxes[:, 3] - boxes[:, 1])[:, None]
    scale = np.concatenate([w, h, w, h], axis=1)
    moved: FloatArray = (boxes + offsets * scale).astype(np.float32)
    return moved


def _square(boxes: FloatArray) -> FloatArray:
    # R-Net and O-Net take square inputs: grow the short side about the centre so the
    # resize to 24x24 / 48x48 does not distort the face.
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    half = side / 2
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1).astype(np.float32)


def pyramid_scales(height: int, width: int, min_face_size: int, factor: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window covers faces from `min_face_size` upwards.

    The first scale maps a `min_face_size` face onto 12 pixels; each next one shrinks by
    `factor` until the short side of the level would be under 12 pixels.
    """
    scale = _CELL / min_face_size
    short = min(height, width) * scale
    scales: list[float] = []
    while short >= _CELL:
        scales.append(scale)
        scale *= factor
        short *= factor
    return scales


class MTCNN:
    """The three-stage MTCNN cascade over batches of uint8 RGB frames.

    Holds no state between calls besides the nets, so it is as thread-safe as they are.
    """

    def __init__(
        self,
        nets: tuple[Net, Net, Net],
        *,
        min_face_size: int = 40,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        max_side: int = _MAX_SIDE,
    ) -> None:
        """Take P-Net, R-Net and O-Net, in that order, as array functions (see `Net`).

        `max_side`: frames whose long side is larger are shrunk to it for the cascade
        and the boxes mapped back, so `min_face_size` counts pixels of the shrunk frame.

        Raises ValueError for a minimum face under 12 pixels or a factor outside (0, 1).
        """
        if min_face_size < _CELL:
            raise ValueError(f"min_face_size must be at least {_CELL}, got {min_face_size}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must lie in (0, 1), got {factor}")
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        if max_side < _CELL:
            raise ValueError(f"max_side must be at least {_CELL}, got {max_side}")
        self.max_side = max_side
        self.pnet, self.rnet, self.onet = nets

    def detect(self, images: list[npt.NDArray[np.uint8]]) -> list[list[Detection]]:
        """Detect faces in each frame; one list per frame, highest confidence first.

        Frames are uint8 RGB arrays of shape (H, W, 3) and may differ in size; frames of one
        size are stacked into shared pyramid passes. A frame whose long side exceeds 1920
        pixels is searched shrunk to 1920, with boxes and landmarks mapped back.
        Raises ValueError for an array of the wrong dtype or shape.
        """
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"expected a uint8 (H, W, 3) RGB frame, got {image.dtype} {image.shape}"
                )
        shrink = [min(1.0, self.max_side / max(image.shape[:2])) for image in images]
        inputs = [
            image if ratio == 1.0 else _shrink(image, ratio)
            for image, ratio in zip(images, shrink, strict=True)
        ]
        results: list[list[Detection]] = [[] for _ in images]
        # Frames of one size and shrink ratio can share each pyramid pass.
        by_size: dict[tuple[int, int, float], list[int]] = {}
        for i, (image, ratio) in enumerate(zip(inputs, shrink, strict=True)):
            by_size.setdefault((image.shape[0], image.shape[1], ratio), []).append(i)
        for (height, width, ratio), members in by_size.items():
            # A shrunk frame must still find faces of min_face_size original pixels.
            min_face = max(_CELL, round(self.min_face_size * ratio))
            per_pass = max(1, _PIXEL_BUDGET // (height * width))
            for start in range(0, len(members), per_pass):
                part = members[start : start + per_pass]
                found = self._detect_batch([inputs[i] for i in part], min_face)
                for i, detections in zip(part, found, strict=True):
                    results[i] = [_unscale(d, ratio) for d in detections]
        return results

    def _detect_batch(
        self, frames: list[npt.NDArray[np.uint8]], min_face_size: int
    ) -> list[list[Detection]]:
        # The first pyramid level and the crops of both later stages read these.
        integrals = [_integral(frame) for frame in frames]
        boxes, frame_of = self._propose(integrals, min_face_size)
        if len(boxes):
            boxes, frame_of = self._refine(integrals, boxes, frame_of)
        if not len(boxes):
            return [[] for _ in frames]
        boxes, scores, landmarks, frame_of = self._output(integrals, boxes, frame_of)
        results: list[list[Detection]] = [[] for _ in frames]
        for k in np.argsort(-scores, kind="stable"):
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            points = _five(landmarks[k].tolist())
            results[int(frame_of[k])].append(Detection(x0, y0, x1, y1, float(scores[k]), points))
        return results

    def _propose(
        self, integrals: list[Integral], min_face_size: int
    ) -> tuple[FloatArray, IntArray]:
        """Stage 1: P-Net over the pyramid; returns squared candidate boxes and their frame."""
        height, width = integrals[0].shape[0] - 1, integrals[0].shape[1] - 1
        found_boxes: list[FloatArray] = []
        found_scores: list[FloatArray] = []
        found_offsets: list[FloatArray] = []
        found_frames: list[IntArray] = []
        first: list[Integral] | None = None
        for scale in pyramid_scales(height, width, min_face_size, self.factor):
            level_h, level_w = math.ceil(height * scale), math.ceil(width * scale)
            # Area averaging reads every source pixel, so the small levels do not alias the
            # way a plain bilinear downscale would. Only the first level reads the full
            # frame; the others shrink the first, which is already 3x smaller per side at
            # the default 40-pixel minimum face and cuts the pyramid's cost several-fold.
            source = integrals if first is None else first
            level = [_area(image, level_h, level_w) for image in source]
            if first is None:
                first = [_integral(image) for image in level]
            prob, offsets_all = _outputs(self.pnet, _normalise(np.stack(level)), 2)
            frame, row, col = np.nonzero(prob >= self.thresholds[0])
            if frame.size == 0:
                continue
            # The per-axis ratio actually used, not the nominal scale, so rounding the level
            # size up does not shift boxes on wide frames.
            sx, sy = level_w / width, level_h / height
            boxes = np.stack(
                [
                    col * _STRIDE / sx,
                    row * _STRIDE / sy,
                    (col * _STRIDE + _CELL) / sx,
                    (row * _STRIDE + _CELL) / sy,
                ],
                axis=1,
            ).astype(np.float32)
            scores = prob[frame, row, col]
            offsets = offsets_all[frame, :, row, col]
            frame = frame.astype(np.int64)
            keep = _batched_nms(boxes, scores, frame, _NMS_LEVEL)
            found_boxes.append(boxes[keep])
            found_scores.append(scores[keep])
            found_offsets.append(offsets[keep])
            found_frames.append(frame[keep])
        if not found_boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        boxes = np.concatenate(found_boxes)
        frames = np.concatenate(found_frames)
        keep = _batched_nms(boxes, np.concatenate(found_scores), frames, _NMS_ACROSS)
        boxes = _regress(boxes[keep], np.concatenate(found_offsets)[keep])
        return _square(boxes), frames[keep]

    def _refine(
        self, integrals: list[Integral], boxes: FloatArray, frame_of: IntArray
    ) -> tuple[FloatArray, IntArray]:
        """Stage 2: R-Net rescoring and regression of the candidates."""
        prob, offsets = _outputs(self.rnet, _crops(integrals, boxes, frame_of, 24), 2)
        passed = prob > self.thresholds[1]
        boxes, frame_of, offsets = boxes[passed], frame_of[passed], offsets[passed]
        keep = _batched_nms(boxes, prob[passed], frame_of, _NMS_ACROSS)
        return _square(_regress(boxes[keep], offsets[keep])), frame_of[keep]

    def _output(
        self, integrals: list[Integral], boxes: FloatArray, frame_of: IntArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
        """Stage 3: O-Net score, final box and landmarks (N, 5, 2)."""
        prob, offsets, marks = _outputs(self.onet, _crops(integrals, boxes, frame_of, 48), 3)
        passed = prob > self.thresholds[2]
        boxes, frame_of, scores = boxes[passed], frame_of[passed], prob[passed]
        offsets, marks = offsets[passed], marks[passed]
        # Landmarks are fractions of the crop O-Net saw, i.e. of the box before regression.
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        xs = boxes[:, 0:1] + marks[:, :5] * w
        ys = boxes[:, 1:2] + marks[:, 5:] * h
        landmarks = np.stack([xs, ys], axis=2).astype(np.float32)
        boxes = _regress(boxes, offsets)
        keep = _batched_nms(boxes, scores, frame_of, _NMS_FINAL, mode="min")
        return boxes[keep], scores[keep], landmarks[keep], frame_of[keep]


def _outputs(net: Net, batch: FloatArray, count: int) -> list[FloatArray]:
    """`net`'s outputs on `batch` as float32 arrays. Raises ValueError for a wrong count."""
    outputs = net(batch)
    if len(outputs) != count:
        raise ValueError(f"expected {count} outputs from the net, got {len(outputs)}")
    return [np.asarray(out, dtype=np.float32) for out in outputs]


def _shrink(image: npt.NDArray[np.uint8], ratio: float) -> npt.NDArray[np.uint8]:
    height, width = image.shape[:2]
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    # An area average, the same antialiasing as the pyramid's.
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _unscale(detection: Detection, ratio: float) -> Detection:
    if ratio == 1.0:
        return detection
    marks = detection.landmarks
    return Detection(
        detection.x0 / ratio,
        detection.y0 / ratio,
        detection.x1 / ratio,
        detection.y1 / ratio,
        detection.confidence,
        None if marks is None else _five([(x / ratio, y / ratio) for x, y in marks]),
    )


def _five(points: list[list[float]] | list[tuple[float, float]]) -> Landmarks:
    p = [(float(x), float(y)) for x, y in points]
    return (p[0], p[1], p[2], p[3], p[4])


def _crops(
    integrals: list[Integral], boxes: FloatArray, frame_of: IntArray, size: int
) -> FloatArray:
    """Normalised (K, 3, size, size) crops of `boxes`; parts outside the frame are black.

    Zero padding, as the reference implementation does, keeps the crop's geometry equal to
    the box's, which is what the regression offsets are relative to; resizing only the
    clipped part would stretch faces at the frame edge. `integrals` are the frames'.
    """
    corners = np.rint(boxes).astype(np.int64)
    x0, y0 = corners[:, 0:1], corners[:, 1:2]
    width = np.maximum(corners[:, 2:3] - x0, 1)
    height = np.maximum(corners[:, 3:4] - y0, 1)
    # The area cells of every crop in frame coordinates, (K, size) each; a cell's count
    # includes its pixels outside the frame, which are black.
    ys0, ys1 = _windows(y0, height, size)
    xs0, xs1 = _windows(x0, width, size)
    counts = ((ys1 - ys0)[:, :, None] * (xs1 - xs0)[:, None, :]).astype(np.float32)
    out = np.empty((len(boxes), size, size, integrals[0].shape[2]), dtype=np.float32)
    for f in np.unique(frame_of):
        members = np.flatnonzero(frame_of == f)
        sums = _box_sums(integrals[int(f)], ys0[members], ys1[members], xs0[members], xs1[members])
        out[members] = sums / counts[members][..., None]
    return _normalise(out)


def _box_sums(
    integral: Integral, y0: IntArray, y1: IntArray, x0: IntArray, x1: IntArray
) -> FloatArray:
    """(K, size, size, C) sums over rows y0 to y1 - 1 by columns x0 to x1 - 1, each (K, size),
    of the image of `integral`, counting cells outside the image as zero."""
    rows, cols = integral.shape[0], integral.shape[1]
    flat = integral.reshape(rows * cols, -1)
    y0, y1 = np.clip(y0, 0, rows - 1), np.clip(y1, 0, rows - 1)
    x0, x1 = np.clip(x0, 0, cols - 1), np.clip(x1, 0, cols - 1)

    def at(y: IntArray, x: IntArray) -> Integral:
        corner: Integral = np.take(flat, y[:, :, None] * cols + x[:, None, :], axis=0)
        return corner

    sums: FloatArray = (at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)).astype(np.float32)
    return sums
