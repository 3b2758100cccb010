"""Generate small test media (video, stills, animations, audio, broken files) with PyAV and Pillow.

Every video frame carries its own frame number as a strip of black/white blocks along the
top edge (`read_index` decodes it), so a test can tell exactly which frame a sampler
returned without trusting timestamps. The rest of the frame is a moving gradient, so
consecutive frames differ and the encoder produces real P/B frames.

Encoders run with `thread_type="FRAME"`: PyAV's default slice threading makes x264 write
several slices per frame, which real files rarely have (see shared/PERF_NOTES.md).
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

INDEX_BITS = 12
"""Bits in the frame-number strip: up to 4095 frames per clip."""

_CONTAINER_FOR_CODEC = {
    "libx264": "mp4",
    "libx265": "mp4",
    "libvpx-vp9": "webm",
    "libvpx": "webm",
    "libaom-av1": "mp4",
    "libsvtav1": "mp4",
    "mpeg4": "mp4",
}

# Fast, quiet, deterministic settings per encoder; scene-cut detection off so the GOP is
# exactly `gop` frames, which the keyframe tests rely on.
_ENCODER_OPTIONS = {
    "libx264": {"preset": "ultrafast", "sc_threshold": "0", "crf": "20"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=error:scenecut=0:open-gop=1"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
}


def encoder_available(codec: str) -> bool:
    """Whether this PyAV build can encode with `codec` (tests skip the codec otherwise)."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


def index_pattern(index: int, width: int, height: int) -> np.ndarray:
    """The frame-number strip for frame `index`: `INDEX_BITS` blocks, white for a 1 bit."""
    strip = np.zeros((max(16, height // 6), width, 3), dtype=np.uint8)
    block = width // INDEX_BITS
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            strip[:, bit * block : (bit + 1) * block] = 255
    return strip


def read_index(image: np.ndarray) -> int:
    """Decode the frame number `index_pattern` drew into an RGB frame (any scale)."""
    height, width = image.shape[:2]
    rows = image[: max(2, height // 6 - max(2, height // 40)), :, :].astype(np.float32)
    block = width / INDEX_BITS
    value = 0
    for bit in range(INDEX_BITS):
        # Sample the middle half of each block: block edges blur under 4:2:0 and scaling.
        lo, hi = int(bit * block + block / 4), int(bit * block + 3 * block / 4)
        if rows[:, lo:hi].mean() > 128:
            value |= 1 << bit
    return value


def _frame_image(index: int, fps: float, width: int, height: int, faces: bool) -> np.ndarray:
    t = index / fps
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = ((xs + 40 * t * 25) % 256).astype(np.uint8)
    image[..., 1] = ((ys * 2 + 30 * t * 25) % 256).astype(np.uint8)
    image[..., 2] = (((xs + ys) / 2) % 256).astype(np.uint8)
    if faces:
        # Cheap face-like blobs: a skin-tone ellipse with two dark eyes, drifting sideways.
        cx = width * (0.3 + 0.4 * ((t * 0.2) % 1.0))
        cy = height * 0.55
        ax, ay = width * 0.12, height * 0.2
        face = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0
        image[face] = (224, 172, 140)
        for ex in (cx - ax * 0.4, cx + ax * 0.4):
            eye = ((xs - ex) / (ax * 0.15)) ** 2 + ((ys - (cy - ay * 0.25)) / (ay * 0.1)) ** 2
            image[eye <= 1.0] = (40, 30, 30)
    strip = index_pattern(index, width, height)
    image[: strip.shape[0]] = strip
    return image


def make_video(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    width: int = 320,
    height: int = 240,
    codec: str = "libx264",
    gop: int = 25,
    audio: bool = False,
    faces: bool = False,
    extra_audio_streams: int = 0,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode a clip whose frames show their own index (see `read_index`).

    The container follows `path`'s suffix (.mp4, .mkv, .webm, .mov, .avi). `gop` is the
    exact keyframe interval. `audio=True` adds a 440 Hz tone track (AAC in mp4/mov,
    Opus in webm/mkv); `extra_audio_streams` adds that many more, for stream-cap tests.
    `options` override the encoder's (the defaults make no B-frames for x264).
    """
    path = Path(path)
    n_frames = round(seconds * fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(
            codec, rate=fps, options={**_ENCODER_OPTIONS.get(codec, {}), **(options or {})}
        )
        assert isinstance(stream, av.VideoStream)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_type = "FRAME"
        audio_streams = [
            _add_audio_stream(container, path.suffix)
            for _ in range(int(audio) + extra_audio_streams)
        ]
        for i in range(n_frames):
            image = _frame_image(i, fps, width, height, faces)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        for audio_stream in audio_streams:
            _encode_tone(container, audio_stream, seconds)
    return path


def _add_audio_stream(container: av.container.OutputContainer, suffix: str) -> av.AudioStream:
    codec = "libopus" if suffix in (".webm", ".mkv") else "aac"
    stream = container.add_stream(codec, rate=48000)
    assert isinstance(stream, av.AudioStream)
    stream.layout = "stereo"
    return stream


def _encode_tone(
    container: av.container.OutputContainer,
    stream: av.AudioStream,
    seconds: float,
    *,
    rate: int = 48000,
    channels: int = 2,
    freq: float = 440.0,
    sample_format: str = "fltp",
) -> None:
    total = round(seconds * rate)
    chunk = 1024
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n) / rate).astype(np.float32)
        wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
        layout = "mono" if channels == 1 else "stereo"
        if sample_format == "s16":
            data = np.tile((wave * 32767).astype(np.int16), (channels, 1)).T.reshape(1, -1)
        else:
            data = np.tile(wave, (channels, 1))
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(data), format=sample_format, layout=layout
        )
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_audio(
    path: Path,
    seconds: float = 2.0,
    fmt: Literal["wav", "mp3", "flac"] = "wav",
    *,
    rate: int = 44100,
    channels: int = 2,
) -> Path:
    """Encode a 440 Hz tone as WAV (PCM s16), MP3 (LAME) or FLAC."""
    path = Path(path)
    codec, sample_format = {
        "wav": ("pcm_s16le", "s16"),
        "mp3": ("libmp3lame", "fltp"),
        "flac": ("flac", "s16"),
    }[fmt]
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        assert isinstance(stream, av.AudioStream)
        stream.layout = "mono" if channels == 1 else "stereo"
        stream.format = sample_format
        _encode_tone(
            container, stream, seconds, rate=rate, channels=channels, sample_format=sample_format
        )
    return path


def make_image(
    path: Path,
    *,
    width: int = 96,
    height: int = 64,
    fmt: str = "JPEG",
    exif_orientation: int | None = None,
) -> Path:
    """Save a still: left half red, right half blue, so a test can see rotation and mirroring.

    `exif_orientation` (JPEG only) writes EXIF tag 0x0112, e.g. 6 = "rotate 90° clockwise
    to display".
    """
    path = Path(path)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (220, 30, 30)
    image[:, width // 2 :] = (30, 30, 220)
    pil = Image.fromarray(image)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        pil.save(path, format=fmt, exif=exif.tobytes())
    else:
        pil.save(path, format=fmt)
    return path


def animated_colour(index: int) -> tuple[int, int, int]:
    """The solid colour of frame `index` in `make_animated` output (palette-safe)."""
    return ((index * 47) % 256, (255 - index * 23) % 256, (index * 91 + 60) % 256)


def make_animated(
    path: Path,
    fmt: Literal["GIF", "WEBP"] = "GIF",
    frames: int = 10,
    *,
    width: int = 64,
    height: int = 48,
    frame_ms: int = 100,
) -> Path:
    """Save an animation whose frame `i` is solid `animated_colour(i)`, `frame_ms` per frame."""
    path = Path(path)
    images = [Image.new("RGB", (width, height), animated_colour(i)) for i in range(frames)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(
        path,
        format=fmt,
        save_all=True,
        append_images=images[1:],
        duration=frame_ms,
        loop=0,
        **extra,
    )
    return path


def make_png_header(path: Path, *, width: int, height: int) -> Path:
    """Write a tiny PNG whose header claims `width`x`height` (a decompression-bomb shape)."""
    path = Path(path)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def make_corrupt(path: Path, src: Path, *, keep: float = 0.5) -> Path:
    """Copy the first `keep` fraction of `src` to `path`: a truncated download."""
    path = Path(path)
    data = Path(src).read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path
