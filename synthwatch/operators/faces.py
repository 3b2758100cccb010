"""Face detection and face crops for the frame classifiers.

MesoNet (Afchar et al. 2018) was trained on 256x256 crops of the face box enlarged about
1.3x, so `crop_faces` reproduces that framing. Detection is MTCNN (Zhang et al. 2016), see
`synthwatch.models.mtcnn`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from synthwatch.errors import ModelUnavailable
from synthwatch.models.mtcnn import MTCNN, Detection, Net
from synthwatch.models.registry import BUNDLED_DIR, LBP_CASCADE

if TYPE_CHECKING:
    import cv2

Box = tuple[float, float, float, float]


class FaceFinder(Protocol):
    """What the engine needs from a face detector: faces per frame, best first."""

    def detect(self, frames: list[npt.NDArray[np.uint8]]) -> list[list[Detection]]: ...


@dataclass(frozen=True, slots=True)
class FaceCrop:
    """A square RGB face crop and where it came from in the frame.

    `box` is the detector's box; `crop_box` is the enlarged square actually cropped,
    always inside the frame.
    """

    image: npt.NDArray[np.uint8]
    box: Box
    crop_box: Box
    confidence: float


def _check_frame(frame: npt.NDArray[np.uint8]) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB frame, got {frame.dtype} {frame.shape}")


def _resize(square: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    # Pillow widens the bilinear kernel when it shrinks, so this is antialiased: a plain
    # bilinear sample of a 600-pixel face down to 256 would alias the fine texture that
    # the classifiers look at.
    image = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def crop_faces(
    frame: npt.NDArray[np.uint8],
    detections: list[Detection],
    *,
    scale: float = 1.3,
    size: int = 256,
    min_confidence: float = 0.9,
) -> list[FaceCrop]:
    """Cut a `size` x `size` RGB crop around each detection of at least `min_confidence`.

    The square has side `scale` x the box's longer side and the box's centre. Where it
    would reach past the frame it is shifted inward (and, if larger than the frame,
    shrunk to the frame's shorter side) rather than padded: the detectors were trained on
    crops cut from whole frames, which never carry black borders, and a padded border
    moves a real face out of their distribution. (Measured on MesoNet's own test faces,
    which are tight crops: padding turned a real face's 0.01 into 0.68 with Meso-4 DF.)
    Raises ValueError for a frame that is not uint8 (H, W, 3).
    """
    _check_frame(frame)
    height, width = frame.shape[:2]
    crops: list[FaceCrop] = []
    for det in detections:
        if det.confidence < min_confidence:
            continue
        if det.x1 <= 0 or det.y1 <= 0 or det.x0 >= width or det.y0 >= height:
            continue  # entirely outside the frame: nothing of the face to classify
        side = max(1, min(round(scale * max(det.x1 - det.x0, det.y1 - det.y0)), width, height))
        # Integer corners so the crop is exactly square in pixels, clamped into the frame.
        x0 = min(max(round((det.x0 + det.x1 - side) / 2), 0), width - side)
        y0 = min(max(round((det.y0 + det.y1 - side) / 2), 0), height - side)
        x1, y1 = x0 + side, y0 + side
        square = frame[y0:y1, x0:x1]
        crops.append(
            FaceCrop(
                image=_resize(np.ascontiguousarray(square), size),
                box=(det.x0, det.y0, det.x1, det.y1),
                crop_box=(float(x0), float(y0), float(x1), float(y1)),
                confidence=det.confidence,
            )
        )
    return crops


class FaceDetector:
    """The MTCNN cascade over the three nets; finds faces in batches of frames.

    `nets` are P-Net, R-Net and O-Net as array functions (`synthwatch.models.mtcnn.Net`):
    on the scan path ONNX Runtime sessions, so this needs no torch. `min_size` and
    `threshold` are the settings' `models.face_min_size` and `models.face_threshold`; the
    threshold is O-Net's, the last stage's, so it is the minimum confidence of every
    returned detection. The earlier stages keep the published 0.6 and 0.7: raising them
    loses faces that O-Net would have accepted.
    """

    def __init__(
        self,
        nets: tuple[Net, Net, Net],
        *,
        min_size: int = 40,
        threshold: float = 0.9,
        max_side: int = 1920,
    ) -> None:
        """`max_side`: frames are searched at most this large (long side), the boxes
        mapped back to the full frame, where the crops are cut. Raises ValueError for a
        `min_size` under 12 pixels."""
        self._mtcnn = MTCNN(
            nets, min_face_size=min_size, thresholds=(0.6, 0.7, threshold), max_side=max_side
        )

    def detect(self, frames: list[npt.NDArray[np.uint8]]) -> list[list[Detection]]:
        """Faces per frame, highest confidence first. Raises ValueError for a bad frame."""
        return self._mtcnn.detect(frames)


class CascadeFaceDetector:
    """Frontal faces with OpenCV's LBP cascade (scikit-image's copy, fetched at install).

    The fallback when the MTCNN weights (third-party) are not installed, so that a fresh
    machine still finds faces for our own face model. It finds fewer faces than MTCNN
    (2 of the 5-7 per frame on ../shared's multi-face clip), misses profiles and gives no
    confidence, so its detections carry confidence 1.0 and no landmarks. Frames are
    scanned at most `max_side` pixels wide; boxes are mapped back to the frame's
    coordinates.

    The cascade is OpenCV's `lbpcascade_frontalface` (24x24 LBP features, boosted
    stumps), of which scikit-image ships a copy. OpenCV's `CascadeClassifier` evaluates
    it about 13x faster than scikit-image's `Cascade` (about 20 ms against 300 ms for a
    640x480 frame on one core, same boxes within a few pixels), and face detection was
    most of the CPU time of a scan with our own models only (`benchmarks/bench_e2e.py`).
    `threads` caps OpenCV's worker threads (a process-wide setting of OpenCV). Safe to
    call from several threads at once.
    """

    name = "lbp_cascade"

    def __init__(self, *, min_size: int = 40, max_side: int = 640, threads: int = 1) -> None:
        import cv2

        if threads > 0:
            cv2.setNumThreads(threads)
        # One classifier per thread: detectMultiScale keeps per-call state in the object,
        # and two threads in one classifier fail an assertion in OpenCV (setWindow).
        # This thread's is loaded now, so a cascade that cannot load fails at start.
        self._local = threading.local()
        self._local.cascade = _lbp_frontal_cascade()
        self._min_size = min_size
        self._max_side = max_side

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade: cv2.CascadeClassifier | None = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = _lbp_frontal_cascade()
        return cascade

    def detect(self, frames: list[npt.NDArray[np.uint8]]) -> list[list[Detection]]:
        """Faces per frame, largest first. Raises ValueError for a bad frame."""
        import cv2

        out: list[list[Detection]] = []
        for frame in frames:
            _check_frame(frame)
            height, width = frame.shape[:2]
            gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
            scale = max(1.0, max(height, width) / self._max_side)
            if scale > 1.0:
                size = (max(1, round(width / scale)), max(1, round(height / scale)))
                gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
            min_side = max(24, round(self._min_size / scale))
            max_side = max(min_side, min(gray.shape[:2]))
            found = self._cascade().detectMultiScale(
                gray,
                scaleFactor=1.2,
                minNeighbors=4,
                minSize=(min_side, min_side),
                maxSize=(max_side, max_side),
            )
            dets = [
                Detection(
                    x0=float(x) * scale,
                    y0=float(y) * scale,
                    x1=float(x + w) * scale,
                    y1=float(y + h) * scale,
                    confidence=1.0,
                )
                for x, y, w, h in np.asarray(found, dtype=np.int64).reshape(-1, 4)
            ]
            dets.sort(key=lambda d: (d.x1 - d.x0) * (d.y1 - d.y0), reverse=True)
            out.append(dets)
        return out


def _lbp_frontal_cascade() -> cv2.CascadeClassifier:
    """OpenCV's LBP frontal-face cascade, scikit-image's copy of the file, which
    `python -m synthwatch.models.fetch` installs beside the bundled weights.

    scikit-image's copy misspells one tag (`featuhreParams`; its own parser does not
    read it), so OpenCV is given the corrected text from memory rather than the path.
    Raises ModelUnavailable when the file is missing, altered or unreadable.
    """
    import cv2

    path = BUNDLED_DIR / LBP_CASCADE.path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelUnavailable(
            f"the LBP face cascade could not be read: {exc}; install it with "
            "`python -m synthwatch.models.fetch` (`make install` does)"
        ) from exc
    if hashlib.sha256(raw).hexdigest() != LBP_CASCADE.sha256:
        raise ModelUnavailable(f"{path}: not the LBP face cascade the registry pins")
    text = raw.decode("utf-8")
    text = text.replace("<featuhreParams>", "<featureParams>").replace(
        "</featuhreParams>", "</featureParams>"
    )
    storage = cv2.FileStorage(text, cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
    cascade = cv2.CascadeClassifier()
    if not cascade.read(storage.getFirstTopLevelNode()) or cascade.empty():
        raise ModelUnavailable("OpenCV could not load the LBP face cascade")
    return cascade


TRACK_MAX_SHIFT = 1.0
"""How far a face's centre may lie from where its track predicts it, and still be the same
face, in units of the face's own size. Sampled frames can lie a second or more apart,
so a person who crosses the frame between two of them is counted again; a talking head,
a panel of speakers or a crowd that moves at walking pace keeps one number per person."""


@dataclass
class _Track:
    box: Box
    frame: int
    velocity: tuple[float, float] = (0.0, 0.0)
    """Centre shift per sampled frame, from the track's last two sightings."""

    def predicted(self, frame: int) -> tuple[float, float]:
        cx, cy = _centre(self.box)
        steps = frame - self.frame
        return cx + self.velocity[0] * steps, cy + self.velocity[1] * steps

    def update(self, box: Box, frame: int) -> None:
        (ax, ay), (bx, by) = _centre(self.box), _centre(box)
        steps = max(1, frame - self.frame)
        self.velocity = ((bx - ax) / steps, (by - ay) / steps)
        self.box, self.frame = box, frame


def track_faces(boxes_per_frame: list[list[Box]]) -> list[list[int]]:
    """A face number for every box: boxes of the sampled frames that are the same face
    share one, so the count of distinct numbers is the count of distinct faces rather
    than of detections.

    Each face seen so far predicts where it is now (constant velocity from its last two
    sightings); the frame's boxes are matched to those predictions greedily, closest
    first, within `TRACK_MAX_SHIFT` face sizes and a size ratio of 2. A face may skip
    frames in which its detection was missed. Two boxes of one frame are never the
    same face.
    """
    tracks: list[_Track] = []
    out: list[list[int]] = []
    for frame, boxes in enumerate(boxes_per_frame):
        pairs: list[tuple[float, int, int]] = []
        for i, box in enumerate(boxes):
            for t, track in enumerate(tracks):
                distance = _face_distance(box, track.box, track.predicted(frame))
                if distance <= TRACK_MAX_SHIFT:
                    pairs.append((distance, i, t))
        ids = [-1] * len(boxes)
        taken: set[int] = set()
        for _distance, i, t in sorted(pairs):
            if ids[i] == -1 and t not in taken:
                ids[i] = t
                taken.add(t)
        for i, box in enumerate(boxes):
            if ids[i] == -1:
                ids[i] = len(tracks)
                tracks.append(_Track(box, frame))
            else:
                tracks[ids[i]].update(box, frame)
        out.append(ids)
    return out


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _face_distance(box: Box, last: Box, predicted: tuple[float, float]) -> float:
    """Distance from `box`'s centre to a track's predicted centre over the mean face size;
    faces of very different sizes (more than 2x) are never the same face."""
    size_a = max(box[2] - box[0], box[3] - box[1], 1e-6)
    size_b = max(last[2] - last[0], last[3] - last[1], 1e-6)
    if max(size_a, size_b) > 2 * min(size_a, size_b):
        return float("inf")
    cx, cy = _centre(box)
    return float(np.hypot(cx - predicted[0], cy - predicted[1]) / ((size_a + size_b) / 2))
