"""Real training media: find it, decode it, cut faces from it, and record what went in.

Both detectors learn from real media only (the fakes are made from it by `sbi` and
`fingerprint`), so "data" here is a set of real photographs and video frames plus a
manifest (file, sha256, frame times) that the model card and the training report
publish: anyone can check which files a released model saw.

The split into training and validation is by source group, never by frame: frames of
one clip are near-duplicates, and a validation score on frames whose neighbours were
trained on measures memory, not generalisation. A group is one file (by content hash,
so a file copied into two directories is one source), or a set of bundled files that
show the same scene (the two views of skimage's stereo motorcycle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from synthwatch.digest import file_sha256
from synthwatch.errors import SynthwatchError
from synthwatch.models.mtcnn import Detection
from synthwatch.operators.faces import FaceFinder, crop_faces
from synthwatch.operators.sample import SampleSettings, sample
from synthwatch.operators.sniff import HEAD_BYTES, sniff
from synthwatch.train.sbi import CROP_WORK_SIZE, Face

U8 = npt.NDArray[np.uint8]
T = TypeVar("T")

FRAMES_PER_VIDEO = 16
"""Frames drawn evenly from each video (and animated image): enough to cover a clip's
poses and lighting, few enough that one long clip does not outweigh many photographs."""

SKIMAGE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut.png", "astronaut"),
    ("chelsea.png", "chelsea"),
    ("coffee.png", "coffee"),
    ("rocket.jpg", "rocket"),
    ("motorcycle_left.png", "motorcycle"),
    ("motorcycle_right.png", "motorcycle"),
)
"""(file in skimage/data, split group): the colour camera photographs that ship inside
scikit-image. Left out on purpose: hubble_deep_field (a telescope composite),
retina (fundus camera), immunohistochemistry (microscopy), the grayscale images, and
the drawn or synthetic ones (logo, colorwheel, text, chessboard): none is the kind of
photograph the scanner is asked about. The stereo pair shares one group."""

SKLEARN_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")
"""scikit-learn's `load_sample_images` photographs (sklearn/datasets/images)."""


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One manifest row: a file that went into training, and what was drawn from it."""

    source: str
    """The path as found, or `skimage:<file>` / `sklearn:<file>` for bundled photos."""
    sha256: str
    group: str
    """Split unit: sources sharing a group always land on the same side of the split."""
    media_type: str
    frame_times: tuple[float, ...]
    width: int
    height: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "group": self.group,
            "media_type": self.media_type,
            "frames": len(self.frame_times),
            "frame_times_s": [round(t, 3) for t in self.frame_times],
            "width": self.width,
            "height": self.height,
        }


@dataclass(frozen=True, slots=True)
class RealFrame:
    """One real picture: a still, or a frame of a video or animation."""

    source: str
    group: str
    time_s: float
    image: U8


@dataclass(frozen=True, slots=True)
class RealFace:
    """A face cut from a `RealFrame` at `CROP_WORK_SIZE`, with its box and landmarks."""

    source: str
    group: str
    time_s: float
    face: Face
    confidence: float


@dataclass
class RealSet:
    """Everything collected: frames in file order, the manifest, and what was refused."""

    frames: list[RealFrame] = field(default_factory=list)
    sources: list[SourceRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of files that were found but could not be used."""


def find_media(dirs: Iterable[Path]) -> list[Path]:
    """Image and video files under `dirs` (recursive), by magic bytes, in sorted order.

    Sorted so that the same directories give the same training run on every machine;
    audio-only and unknown files are not returned.
    """
    found: set[Path] = set()
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"not a directory: {root}")
        for path in root.rglob("*"):
            if path.is_file() and _media_type(path) in ("image", "video"):
                found.add(path)
    return sorted(found)


def _media_type(path: Path) -> str | None:
    with path.open("rb") as f:
        kind = sniff(f.read(HEAD_BYTES))
    return kind[1] if kind else None


def collect_real(
    dirs: Sequence[Path],
    *,
    frames_per_video: int = FRAMES_PER_VIDEO,
    include_bundled: bool = True,
) -> RealSet:
    """Decode every image and `frames_per_video` evenly spaced frames of every video
    under `dirs`, then the bundled photographs (skimage, sklearn) when asked.

    Files are decoded by `synthwatch.operators.sample` with its allow-lists and caps, so
    training sees frames exactly as the scanner will. A file the sampler refuses goes to
    `skipped` with its reason; a second copy of a file already collected (same sha256)
    is not decoded again. Raises FileNotFoundError for a directory that does not exist.
    """
    real = RealSet()
    seen: set[str] = set()
    settings = SampleSettings(frames=frames_per_video, max_frames=frames_per_video, audio=False)
    for path in find_media(dirs):
        digest = file_sha256(path)
        if digest in seen:
            real.skipped.append((str(path), "duplicate"))
            continue
        try:
            sampled = sample(path, settings, media_type=_media_type(path))
        except SynthwatchError as exc:
            real.skipped.append((str(path), exc.reason))
            continue
        if not sampled.frames:
            real.skipped.append((str(path), "no_frames"))
            continue
        seen.add(digest)
        _add(real, str(path), digest, digest, sampled.media_type, sampled.frames)
    if include_bundled:
        for source, group, path in bundled_photo_files():
            digest = file_sha256(path)
            if digest in seen:
                continue
            seen.add(digest)
            with Image.open(path) as pil:
                image = np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
            _add(real, source, digest, group, "image", [_Still(image)])
    return real


@dataclass(frozen=True, slots=True)
class _Still:
    image: U8
    time_s: float = 0.0


class _HasImage(Protocol):
    @property
    def image(self) -> U8: ...
    @property
    def time_s(self) -> float: ...


def _add(
    real: RealSet,
    source: str,
    digest: str,
    group: str,
    media_type: str,
    frames: Sequence[_HasImage],
) -> None:
    height, width = frames[0].image.shape[:2]
    real.sources.append(
        SourceRecord(
            source, digest, group, media_type, tuple(f.time_s for f in frames), width, height
        )
    )
    real.frames.extend(RealFrame(source, group, f.time_s, f.image) for f in frames)


def bundled_photo_files() -> list[tuple[str, str, Path]]:
    """(manifest name, split group, path) of the photographs shipped inside skimage and
    sklearn. Raises FileNotFoundError if an installed package lacks one."""
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    out = [
        (f"skimage:{name}", f"skimage:{group}", skimage_dir / name)
        for name, group in SKIMAGE_PHOTOS
    ]
    out += [(f"sklearn:{name}", f"sklearn:{name}", sklearn_dir / name) for name in SKLEARN_PHOTOS]
    for _, _, path in out:
        if not path.is_file():
            raise FileNotFoundError(f"bundled photograph missing: {path}")
    return out


def detect_faces(
    frames: Sequence[RealFrame],
    detector: FaceFinder,
    *,
    size: int = CROP_WORK_SIZE,
    min_confidence: float = 0.9,
    batch: int = 8,
) -> list[RealFace]:
    """Every face the detector finds in `frames`, cut as the scanner cuts it (box enlarged
    1.3x, square, inside the frame) at `size`, with box and landmarks in crop pixels."""
    faces: list[RealFace] = []
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        found = detector.detect([f.image for f in chunk])
        for frame, detections in zip(chunk, found, strict=True):
            for det in detections:
                crops = crop_faces(
                    frame.image, [det], scale=1.3, size=size, min_confidence=min_confidence
                )
                if not crops:
                    continue
                crop = crops[0]
                face = _face_in_crop(crop.image, det, crop.crop_box)
                faces.append(
                    RealFace(frame.source, frame.group, frame.time_s, face, det.confidence)
                )
    return faces


def _face_in_crop(image: U8, det: Detection, crop_box: tuple[float, float, float, float]) -> Face:
    x0, y0, x1, _ = crop_box
    ratio = image.shape[1] / (x1 - x0)
    box = (
        (det.x0 - x0) * ratio,
        (det.y0 - y0) * ratio,
        (det.x1 - x0) * ratio,
        (det.y1 - y0) * ratio,
    )
    landmarks = None
    if det.landmarks is not None:
        landmarks = (np.asarray(det.landmarks, dtype=np.float64) - [x0, y0]) * ratio
    return Face(image=image, box=box, landmarks=landmarks)


def split_by_source(
    items: Sequence[T],
    *,
    group: Callable[[T], str],
    val_fraction: float = 0.2,
    seed: int = 0,
    balance: Literal["groups", "items"] = "groups",
) -> tuple[list[T], list[T]]:
    """(train, validation) with every group wholly on one side.

    Groups are ranked by sha256(seed, group), so the split depends only on the seed
    and the group names, not on the order items arrive in. Walking that ranking, a group
    goes to validation when validation stays within `val_fraction` of the groups
    (`balance="groups"`) or of the items (`balance="items"`, for when one group, such
    as a crowd video, holds far more items than the rest). With two or more groups,
    validation gets at least one (the smallest, if none fits) and training keeps one.
    Raises ValueError for a fraction outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    sizes: dict[str, int] = {}
    for item in items:
        key = group(item)
        sizes[key] = sizes.get(key, 0) + (1 if balance == "items" else 0)
    if balance == "groups":
        sizes = dict.fromkeys(sizes, 1)
    ranked = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    budget = val_fraction * sum(sizes.values())
    val_groups: set[str] = set()
    taken = 0
    if len(ranked) >= 2 and val_fraction > 0:
        for key in ranked:
            if len(val_groups) < len(ranked) - 1 and taken + sizes[key] <= budget:
                val_groups.add(key)
                taken += sizes[key]
        if not val_groups:  # every group is over budget: hold out the smallest
            val_groups.add(min(ranked, key=lambda g: sizes[g]))
    train = [item for item in items if group(item) not in val_groups]
    val = [item for item in items if group(item) in val_groups]
    return train, val
