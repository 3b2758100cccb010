"""Stills and animations through Pillow: the header is read, and its pixel count
checked, before any pixel is decoded."""

from __future__ import annotations

import bisect
import contextlib
import math
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from synthwatch.errors import CorruptMedia, LimitExceeded, UnsupportedMedia
from synthwatch.operators.sample.common import (
    MAX_SIDE,
    Deadline,
    Frame,
    MediaInfo,
    Sampled,
    SampleSettings,
    StreamInfo,
    capped,
    hms,
    mpx,
    setting,
    target_times,
)
from synthwatch.operators.sniff import sniff

# Pillow format names. A camera JPEG carrying a second picture opens as "MPO" through the
# JPEG plugin; it is a still, not an animation. HEIF needs the optional pillow-heif plugin
# (`pip install 'synthwatch[heif]'`: its wheels bundle libheif and codecs under LGPL/GPL
# terms, so it is not a default dependency); AVIF is Pillow's own.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF")
TIFF_COMPRESSIONS = frozenset(
    {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", "jpeg", "tiff_jpeg"}
)
"""TIFF codecs we decode: what cameras, scanners and image editors write. TIFF names
dozens of others (CCITT fax, JBIG, old-style JPEG, ...), rare in uploads and with a long
history of decoder bugs; they are refused by name before any pixel is decoded."""
JPEG_MAX_REDUCTION = 8
"""libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients, so a JPEG
up to 8x8 times `max_pixels` is sampled at reduced size without a full-size buffer."""
ANIMATED_FORMATS = frozenset({"GIF", "WEBP", "PNG"})

# EXIF orientation -> the transpose that displays the image upright (as ImageOps does).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# What Pillow raises on a broken file: truncation is OSError, a bad header often
# SyntaxError; the GIF plugin indexes past the end of a truncated block (IndexError).
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@contextmanager
def image_errors(settings: SampleSettings) -> Iterator[None]:
    """Turn Pillow's failures into the project's error types."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(_bomb(exc, settings)) from None
    except _PILLOW_ERRORS as exc:
        raise CorruptMedia(f"image does not decode: {type(exc).__name__}") from None


def _bomb(exc: Image.DecompressionBombError, settings: SampleSettings) -> str:
    """Pillow's own size check fired (the sandbox sets its cap to ours): say so in the
    words of our other limits."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{mpx(int(found.group(1)))} " if found else ""
    return (
        f"image of {size}is over the cap of {mpx(settings.max_pixels)} "
        f"({setting('max_pixels')}={settings.max_pixels})"
    )


def register_plugins() -> None:
    """Every Pillow plugin we accept, HEIF's too when its optional package is installed."""
    Image.init()  # registers WEBP; Image.open only preloads a few plugins by itself
    with contextlib.suppress(ImportError):
        import pillow_heif

        pillow_heif.register_heif_opener()


def open_image(path: Path, head: bytes, settings: SampleSettings) -> Image.Image:
    register_plugins()
    kind = sniff(head)
    image: Image.Image
    try:
        # Image.open reads the header only; pixels are decoded on load(). It also
        # refuses, from the header, an image over Pillow's pixel cap (the sandbox sets
        # it to ours), except for a JPEG: that may be larger, as it decodes at down to
        # 1/8 scale, so it is opened by its plugin and `_check_image` judges its size.
        if kind == ("image/jpeg", "image"):
            image = JpegImagePlugin.JpegImageFile(path)
        else:
            image = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(_bomb(exc, settings)) from None
    except UnidentifiedImageError:
        if kind in (("image/heic", "image"), ("image/heif", "image")):
            raise UnsupportedMedia(
                "HEIF/HEIC images need the optional pillow-heif plugin: "
                "pip install 'synthwatch[heif]'"
            ) from None
        raise UnsupportedMedia("image format not accepted or unreadable") from None
    except _PILLOW_ERRORS as exc:
        raise CorruptMedia(f"image header does not parse: {type(exc).__name__}") from None
    try:
        _check_image(image, settings)
    except BaseException:
        image.close()
        raise
    return image


def _check_image(image: Image.Image, settings: SampleSettings) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptMedia("image without dimensions")
    fmt = (image.format or "").upper()
    if fmt == "TIFF":
        compression = str(image.info.get("compression", "raw"))
        if compression not in TIFF_COMPRESSIONS:
            raise UnsupportedMedia(f"TIFF compression {compression!r} not accepted")
    pixels = width * height
    if pixels <= settings.max_pixels:
        return
    over = (
        f"image is {width}x{height} ({mpx(pixels)}), over the cap of "
        f"{mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels})"
    )
    if fmt not in ("JPEG", "MPO"):
        raise LimitExceeded(f"{over}; only JPEG can be decoded at a reduced size")
    if pixels > settings.max_pixels * JPEG_MAX_REDUCTION**2:
        raise LimitExceeded(
            f"{over}, even at the 1/{JPEG_MAX_REDUCTION} scale JPEG can be decoded at"
        )


@dataclass
class _Animation:
    starts_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0


def image_info(image: Image.Image, settings: SampleSettings) -> MediaInfo:
    fmt = (image.format or "").upper()
    n_frames = _frame_count(image, settings)
    width, height = image.size
    if _orientation(image) in (5, 6, 7, 8):
        width, height = height, width
    animated = n_frames > 1 and fmt in ANIMATED_FORMATS
    return MediaInfo(
        media_type="video" if animated else "image",
        container=fmt.lower(),
        streams=(StreamInfo(0, "video", fmt.lower()),),
        video_codec=fmt.lower(),
        audio_codec=None,
        duration_s=None,
        width=width,
        height=height,
        frame_rate=None,
        frame_count=n_frames,
    )


def _frame_count(image: Image.Image, settings: SampleSettings) -> int:
    with image_errors(settings):
        return int(getattr(image, "n_frames", 1))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not sink an otherwise good image
        return 1


def _image_array(image: Image.Image, orientation: int) -> np.ndarray:
    rgb = image.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        rgb = rgb.resize(capped(*rgb.size), Image.Resampling.BOX)
    if orientation in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return np.asarray(rgb, dtype=np.uint8).copy()


def _seek(image: Image.Image, n: int, settings: SampleSettings) -> None:
    """Go to frame `n` of an animation, refusing a canvas grown past the pixel cap: a
    GIF frame may lie outside the screen the header declared, and Pillow then enlarges
    the image (its own bomb check only stops far above our cap)."""
    image.seek(n)
    width, height = image.size
    if width * height > settings.max_pixels:
        raise LimitExceeded(
            f"animation frame {n} grows the image to {width}x{height} "
            f"({mpx(width * height)}), over the cap of {mpx(settings.max_pixels)} "
            f"({setting('max_pixels')}={settings.max_pixels})"
        )


def _animation_timeline(
    image: Image.Image, settings: SampleSettings, deadline: Deadline
) -> _Animation:
    """Start time of each frame, of the first `max_image_frames` frames at most."""
    timeline = _Animation()
    elapsed_ms = 0  # whole milliseconds, so times do not drift by float rounding
    for i in range(min(_frame_count(image, settings), settings.max_image_frames)):
        deadline.check()
        _seek(image, i, settings)
        if image.info.get("duration") is None:
            # Pillow's WebP reads a frame's duration only when it decodes the frame:
            # without this every WebP frame lasted the 100 ms default, and a 2.6 s
            # animation read as 6.6 s.
            image.load()
        duration_ms = round(float(image.info.get("duration") or 0))
        timeline.starts_s.append(elapsed_ms / 1000)
        # Browsers show frames of 10 ms or less for 100 ms; so do we.
        elapsed_ms += duration_ms if duration_ms > 10 else 100
    timeline.duration_s = elapsed_ms / 1000
    return timeline


def animation_timeline(
    image: Image.Image, settings: SampleSettings, deadline: Deadline
) -> _Animation:
    """Start time of each of the first `max_image_frames` frames, and their total
    duration: what a caller choosing its own times (vPDQ's one frame a second) needs
    before asking `iter_animation_frames` for them. Raises Pillow's errors; call it
    inside `image_errors`."""
    return _animation_timeline(image, settings, deadline)


def iter_animation_frames(
    image: Image.Image,
    timeline: _Animation,
    times_s: list[float],
    settings: SampleSettings,
    deadline: Deadline,
) -> Iterator[Frame]:
    """The distinct frames shown at `times_s`, in time order, decoded one at a time.

    Unlike `image_frames_at`, which keeps every frame to answer the times in the order
    asked, nothing is kept here: a caller that reduces each frame to something small (a
    hash) holds one image at a time, however many times it asks for. Raises Pillow's
    errors; iterate it inside `image_errors`."""
    for i, n in enumerate(sorted({_animation_frame(timeline, t) for t in times_s})):
        deadline.check()
        _seek(image, n, settings)
        yield Frame(i, timeline.starts_s[n], _image_array(image, 1))


def sample_image(
    image: Image.Image, info: MediaInfo, settings: SampleSettings, deadline: Deadline
) -> Sampled:
    notes: list[str] = []
    with image_errors(settings):
        if info.media_type == "image":
            reduced = _draft(image, settings)
            if reduced is not None:
                notes.append(reduced)
            frames = [Frame(0, 0.0, _image_array(image, _orientation(image)))]
            duration_s, strategy = 0.0, "still"
        else:
            timeline = _animation_timeline(image, settings, deadline)
            total = info.frame_count or len(timeline.starts_s)
            if total > len(timeline.starts_s):
                notes.append(
                    f"animation: only the first {len(timeline.starts_s)} of {total} frames "
                    f"({hms(timeline.duration_s)}) were sampled (cap "
                    f"{setting('max_image_frames')}={settings.max_image_frames})"
                )
            targets = target_times(0.0, timeline.duration_s, settings)
            wanted = sorted({_animation_frame(timeline, t) for t in targets})
            frames = []
            for i, n in enumerate(wanted):
                deadline.check()
                _seek(image, n, settings)
                frames.append(Frame(i, timeline.starts_s[n], _image_array(image, 1)))
            duration_s, strategy = timeline.duration_s, "animated"
    return Sampled(
        media_type=info.media_type,
        frames=frames,
        audio=None,
        duration_s=duration_s,
        width=info.width,
        height=info.height,
        container=info.container,
        video_codec=info.video_codec,
        audio_codec=None,
        keyframes=None,
        strategy=strategy,
        notes=notes,
    )


def _draft(image: Image.Image, settings: SampleSettings) -> str | None:
    """Ask a large JPEG to decode at 1/2, 1/4 or 1/8 scale (free: libjpeg scales the DCT
    coefficients, so no full-size buffer exists): to what the frame is shrunk to anyway
    (`MAX_SIDE`), and always to within `max_pixels`. A note when the image was over the
    pixel cap."""
    if (image.format or "").upper() not in ("JPEG", "MPO"):
        return None
    width, height = image.size
    over = width * height > settings.max_pixels
    if max(width, height) <= MAX_SIDE and not over:
        return None
    request = capped(width, height)
    if over:
        # libjpeg's scaled sizes round up; the largest scale whose result fits the cap.
        scale = next(
            (
                1 / d
                for d in (2, 4, JPEG_MAX_REDUCTION)
                if math.ceil(width / d) * math.ceil(height / d) <= settings.max_pixels
            ),
            1 / JPEG_MAX_REDUCTION,
        )
        fit = (math.ceil(width * scale), math.ceil(height * scale))
        request = (min(request[0], fit[0]), min(request[1], fit[1]))
    image.draft("RGB", request)
    if not over:
        return None
    return (
        f"image: {width}x{height} ({mpx(width * height)}) is over the cap of "
        f"{mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels}); "
        f"decoded at {image.size[0]}x{image.size[1]}"
    )


def _animation_frame(timeline: _Animation, t: float) -> int:
    return max(0, bisect.bisect_right(timeline.starts_s, t + 1e-9) - 1)


def image_frames_at(
    image: Image.Image,
    info: MediaInfo,
    times_s: list[float],
    settings: SampleSettings,
    deadline: Deadline,
) -> list[Frame]:
    if info.media_type == "image":
        _draft(image, settings)
        still = _image_array(image, _orientation(image))
        return [Frame(i, 0.0, still) for i in range(len(times_s))]
    timeline = _animation_timeline(image, settings, deadline)
    wanted = {_animation_frame(timeline, t) for t in times_s}
    arrays: dict[int, np.ndarray] = {}
    for n in sorted(wanted):
        deadline.check()
        _seek(image, n, settings)
        arrays[n] = _image_array(image, 1)
    picks = [_animation_frame(timeline, t) for t in times_s]
    return [Frame(i, timeline.starts_s[n], arrays[n]) for i, n in enumerate(picks)]
