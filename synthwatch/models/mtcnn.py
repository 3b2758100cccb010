"""MTCNN face detector: the P-Net, R-Net and O-Net modules and the three-stage cascade.

The architecture, the input normalisation, the stage thresholds, the 12-pixel P-Net cell with
stride 2, the box-regression scheme and the image-pyramid factor are the facts published by
Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks" (IEEE Signal Processing Letters 23(10)); the state-dict key names, the PReLU
placement and the Caffe flatten order are those of the facenet-pytorch port (timesler, MIT),
whose weight files we load by path. The code is written here; nothing depends on
facenet-pytorch or torchvision.

Boxes use continuous pixel coordinates: (x0, y0) is the top-left corner and (x1, y1) the
bottom-right one, so width = x1 - x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

Point = tuple[float, float]
Landmarks = tuple[Point, Point, Point, Point, Point]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

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
# tensors no longer fit the caches), while several small frames do gain a little.
_PIXEL_BUDGET = 2 * 1920 * 1080

# Frames whose long side exceeds this are shrunk before the cascade and the boxes mapped
# back: it bounds the float copy of an 8K still (800 MB at full size) and the time of the
# first pyramid level, at the price of fewer pixels for O-Net on the smallest faces.
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


def _normalise(pixels: Tensor) -> Tensor:
    # The nets were trained on (x - 127.5) / 128, which maps [0, 255] to about [-1, 1].
    return (pixels - 127.5) * (1.0 / 128.0)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _caffe_flatten(x: Tensor) -> Tensor:
    # The dense layers were trained in Caffe, which the port fed with (N, W, H, C) memory
    # order; flattening PyTorch's (N, C, H, W) directly would scramble the dense weights.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one output cell per 12x12 window, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map normalised (N, 3, H, W) to face probability (N, H', W'), offsets (N, 4, H', W')."""
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.prelu2(self.conv2(h))
        h = self.prelu3(self.conv3(h))
        logits: Tensor = self.conv4_1(h)
        offsets: Tensor = self.conv4_2(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets


class RNet(nn.Module):
    """Refinement net: scores and re-regresses 24x24 crops of the P-Net candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map normalised (N, 3, 24, 24) to face probability (N,) and box offsets (N, 4)."""
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.prelu3(self.conv3(h))
        h = self.prelu4(self.dense4(_caffe_flatten(h)))
        logits: Tensor = self.dense5_1(h)
        offsets: Tensor = self.dense5_2(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets


class ONet(nn.Module):
    """Output net: final score, box offsets and five landmarks for 48x48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map normalised (N, 3, 48, 48) to probability (N,), offsets (N, 4), landmarks (N, 10).

        Landmarks are fractions of the crop: five x values, then five y values.
        """
        h: Tensor = self.pool1(self.prelu1(self.conv1(x)))
        h = self.pool2(self.prelu2(self.conv2(h)))
        h = self.pool3(self.prelu3(self.conv3(h)))
        h = self.prelu4(self.conv4(h))
        h = self.prelu5(self.dense5(_caffe_flatten(h)))
        logits: Tensor = self.dense6_1(h)
        offsets: Tensor = self.dense6_2(h)
        landmarks: Tensor = self.dense6_3(h)
        return torch.softmax(logits, dim=1)[:, 1], offsets, landmarks


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


def _load(net: nn.Module, path: Path, device: torch.device) -> nn.Module:
    state = torch.load(path, map_location=device, weights_only=True)
    # strict=True: a key or shape mismatch means the wrong file or a wrong port, and
    # a silently half-initialised detector would only show up as missed faces.
    net.load_state_dict(state, strict=True)
    # Channels-last runs these small convs and, above all, the max-pools two to three
    # times faster on CPU than NCHW does; inputs are converted to match.
    return net.to(device).to(memory_format=torch.channels_last).eval()


class MTCNN:
    """The three-stage MTCNN cascade over batches of uint8 RGB frames."""

    def __init__(
        self,
        pnet_path: Path,
        rnet_path: Path,
        onet_path: Path,
        *,
        min_face_size: int = 40,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        device: str = "cpu",
    ) -> None:
        """Load the three nets.

        Raises FileNotFoundError for a missing file, pickle.UnpicklingError for one that is
        not a state dict, and RuntimeError when its keys or shapes do not match the nets.
        """
        if min_face_size < _CELL:
            raise ValueError(f"min_face_size must be at least {_CELL}, got {min_face_size}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must lie in (0, 1), got {factor}")
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        self.device = torch.device(device)
        self.pnet = _load(PNet(), pnet_path, self.device)
        self.rnet = _load(RNet(), rnet_path, self.device)
        self.onet = _load(ONet(), onet_path, self.device)

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
        shrink = [min(1.0, _MAX_SIDE / max(image.shape[:2])) for image in images]
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
                batch = np.stack([inputs[i] for i in part])
                with torch.inference_mode():
                    found = self._detect_batch(batch, min_face)
                for i, detections in zip(part, found, strict=True):
                    results[i] = [_unscale(d, ratio) for d in detections]
        return results

    def _detect_batch(
        self, batch: npt.NDArray[np.uint8], min_face_size: int
    ) -> list[list[Detection]]:
        n = batch.shape[0]
        # Plain NCHW: "area" resampling runs about three times faster on it than on the
        # channels-last layout that permuting the (N, H, W, C) array would give.
        pixels = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().contiguous()
        boxes, frame_of = self._propose(pixels, min_face_size)
        if len(boxes):
            boxes, frame_of = self._refine(pixels, boxes, frame_of)
        if not len(boxes):
            return [[] for _ in range(n)]
        boxes, scores, landmarks, frame_of = self._output(pixels, boxes, frame_of)
        results: list[list[Detection]] = [[] for _ in range(n)]
        for k in np.argsort(-scores, kind="stable"):
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            points = _five(landmarks[k].tolist())
            results[int(frame_of[k])].append(Detection(x0, y0, x1, y1, float(scores[k]), points))
        return results

    def _propose(self, pixels: Tensor, min_face_size: int) -> tuple[FloatArray, IntArray]:
        """Stage 1: P-Net over the pyramid; returns squared candidate boxes and their frame."""
        _, _, height, width = pixels.shape
        found_boxes: list[FloatArray] = []
        found_scores: list[FloatArray] = []
        found_offsets: list[FloatArray] = []
        found_frames: list[IntArray] = []
        first: Tensor | None = None
        for scale in pyramid_scales(height, width, min_face_size, self.factor):
            level_h, level_w = math.ceil(height * scale), math.ceil(width * scale)
            # "area" resampling averages every source pixel, so the small levels do not
            # alias the way a plain bilinear downscale would. Only the first level reads the
            # full frame; the others shrink the first, which is already 3x smaller per side
            # at the default 40-pixel minimum face and cuts the pyramid's cost several-fold.
            source = pixels if first is None else first
            level = F.interpolate(source, size=(level_h, level_w), mode="area")
            if first is None:
                first = level
            prob_t, offsets_t = self.pnet(_channels_last(_normalise(level)))
            prob = prob_t.cpu().numpy()
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
            offsets = offsets_t.cpu().numpy()[frame, :, row, col]
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
        self, pixels: Tensor, boxes: FloatArray, frame_of: IntArray
    ) -> tuple[FloatArray, IntArray]:
        """Stage 2: R-Net rescoring and regression of the candidates."""
        prob_t, offsets_t = self.rnet(_channels_last(_crops(pixels, boxes, frame_of, 24)))
        prob = prob_t.cpu().numpy()
        passed = prob > self.thresholds[1]
        boxes, frame_of = boxes[passed], frame_of[passed]
        offsets = offsets_t.cpu().numpy()[passed]
        keep = _batched_nms(boxes, prob[passed], frame_of, _NMS_ACROSS)
        return _square(_regress(boxes[keep], offsets[keep])), frame_of[keep]

    def _output(
        self, pixels: Tensor, boxes: FloatArray, frame_of: IntArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
        """Stage 3: O-Net score, final box and landmarks (N, 5, 2)."""
        prob_t, offsets_t, marks_t = self.onet(_channels_last(_crops(pixels, boxes, frame_of, 48)))
        prob = prob_t.cpu().numpy()
        passed = prob > self.thresholds[2]
        boxes, frame_of, scores = boxes[passed], frame_of[passed], prob[passed]
        offsets = offsets_t.cpu().numpy()[passed]
        marks = marks_t.cpu().numpy()[passed]
        # Landmarks are fractions of the crop O-Net saw, i.e. of the box before regression.
        w = (boxes[:, 2] - boxes[:, 0])[:, None]
        h = (boxes[:, 3] - boxes[:, 1])[:, None]
        xs = boxes[:, 0:1] + marks[:, :5] * w
        ys = boxes[:, 1:2] + marks[:, 5:] * h
        landmarks = np.stack([xs, ys], axis=2).astype(np.float32)
        boxes = _regress(boxes, offsets)
        keep = _batched_nms(boxes, scores, frame_of, _NMS_FINAL, mode="min")
        return boxes[keep], scores[keep], landmarks[keep], frame_of[keep]


def _shrink(image: npt.NDArray[np.uint8], ratio: float) -> npt.NDArray[np.uint8]:
    height, width = image.shape[:2]
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    # BOX is an area average, the same antialiasing as the pyramid's "area" resampling.
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


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


def _crops(pixels: Tensor, boxes: FloatArray, frame_of: IntArray, size: int) -> Tensor:
    """Normalised (K, 3, size, size) crops of `boxes`; parts outside the frame are black.

    Zero padding, as the reference implementation does, keeps the crop's geometry equal to
    the box's, which is what the regression offsets are relative to; resizing only the
    clipped part would stretch faces at the frame edge.
    """
    _, channels, height, width = pixels.shape
    corners = np.rint(boxes).astype(np.int64)
    out = pixels.new_empty((len(boxes), channels, size, size))
    for k, (x0, y0, x1, y1) in enumerate(corners.tolist()):
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        frame = pixels[int(frame_of[k])]
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            patch = frame[:, y0:y1, x0:x1]
        else:
            patch = pixels.new_zeros((channels, y1 - y0, x1 - x0))
            if cx1 > cx0 and cy1 > cy0:
                patch[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = frame[:, cy0:cy1, cx0:cx1]
        out[k] = F.interpolate(patch[None], size=(size, size), mode="area")[0]
    return _normalise(out)
