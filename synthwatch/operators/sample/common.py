"""What both decoders share: the sampling settings, the records they return, the caps'
wording and the decode deadline."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthwatch.errors import LimitExceeded, UnsupportedMedia
from synthwatch.operators.sniff import HEAD_BYTES
from synthwatch.schemas import MediaType


class SampleSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    frames: int = Field(default=16, ge=1)
    """Frames per video item, spread evenly over the duration."""
    seconds_per_frame: float | None = None
    """If set, one frame every k seconds (capped by max_frames) instead of `frames` per item."""
    mode: Literal["exact", "keyframes", "adaptive"] = "adaptive"
    """adaptive (default): a keyframe for each target that has one of its own within half
    the target spacing (so every frame still lies in its target's slice of the duration),
    exact frames for the rest: keyframe-cheap on short GOPs, about exact seek's cost on
    long ones; 22x cheaper per frame than a full decode on a 1080p clip with a keyframe a
    second (benchmarks/bench_sampling.py). exact: seek or decode forward to each target
    time. keyframes: keyframes only, topped up with exact targets when they are too few.

    Exact was the default until it turned out that its better dev-set score was the face
    model recognising its own training frames: sbi_face was trained on the 16 evenly
    spaced frames that exact mode draws from the dev clips, and with 15 or 17 frames
    (frames it never saw) exact's raw video AUC fell from 0.865 to 0.73 and 0.69, as low
    as adaptive's 0.75 on the same 15 targets (docs/EVALUATION.md)."""
    max_frames: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=8192 * 8192, ge=1)
    """Decoded pixels per frame. A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale (up
    to 64x this); other formats over it are refused, as video frames are."""
    max_streams: int = Field(default=16, ge=1)
    max_duration_s: float = Field(default=4 * 3600.0, gt=0)
    """Only this much of a longer video is indexed and sampled (the verdict says so)."""
    max_decode_s: float = Field(default=60.0, gt=0)
    max_image_frames: int = Field(default=2000, ge=1)
    """Only this many frames of a longer animation are sampled (the verdict says so)."""
    audio: bool = True
    max_audio_s: float = Field(default=600.0, gt=0)
    """Only this much of a longer audio track is decoded (the verdict says so)."""
    isolate: bool = True
    """Decode in a child process (operators/sandbox.py) with the caps below and a hard
    deadline, so a decoder crash, hang or memory blow-up fails the item, not the worker.
    Off only to profile the decoder itself."""
    max_memory_mb: int = 2048
    """Address-space cap (RLIMIT_AS) of the decoding child, its ~300 MB of libraries
    included. Measured peaks: 64 frames of 1080p 0.7 GB; a still at `max_pixels` 0.9 GB
    (PNG) to 1.4 GB (WebP with alpha)."""


MAX_SIDE = 1920
"""Frames whose longest side exceeds this are downscaled (aspect kept) to bound memory:
a 16 x 8K RGB sample would be 1.6 GB. Evidence images are drawn from these frames."""


@dataclass(frozen=True)
class Frame:
    """One sampled frame. `image` is what detectors and evidence images are drawn from."""

    index: int
    """Position in the sample (or in the request, for `frames_at`)."""
    time_s: float
    """Presentation time of the decoded frame, not of the target it was chosen for."""
    image: np.ndarray
    """uint8 HxWx3 RGB at full resolution, or downscaled to `MAX_SIDE` on its longest side."""


@dataclass(frozen=True)
class StreamInfo:
    index: int
    type: str
    """FFmpeg's stream type: video, audio, subtitle, data, attachment."""
    codec: str | None
    attached_pic: bool = False
    """Cover art in an audio file: a picture, not a video track."""


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` found; everything in it has passed the allow-lists and caps."""

    media_type: MediaType
    container: str
    """FFmpeg demuxer name (`mov,mp4,m4a,3gp,3g2,mj2`) or Pillow format (`jpeg`, `gif`)."""
    streams: tuple[StreamInfo, ...]
    video_codec: str | None
    audio_codec: str | None
    duration_s: float | None
    width: int
    """Display width (after EXIF or container rotation), before any downscaling."""
    height: int
    frame_rate: float | None
    frame_count: int | None = None
    """Frames in an animation, or in the video stream when the container says."""


@dataclass(frozen=True)
class Sampled:
    media_type: MediaType
    frames: list[Frame]
    audio: np.ndarray | None
    """float32 mono at 16 kHz, at most `max_audio_s` seconds; None without an audio track."""
    duration_s: float
    width: int
    height: int
    container: str
    video_codec: str | None
    audio_codec: str | None
    keyframes: int | None
    """Keyframes in the video stream (from the index pass); None for stills and audio."""
    strategy: str
    """Strategy that ran: smart-seek, keyframes, keyframes+exact, sequential (AVI, decoded
    from the start), still, animated, audio."""
    notes: list[str] = field(default_factory=list)
    """What a cap cut short (the part of a long video or animation that was sampled, a
    huge image decoded at reduced size), for the verdict's notes."""
    sampled_s: float | None = None
    """When a cap cut a video short, how much of it, from its start, frames were sampled
    from: the time segments behind a frame score end there, not at `duration_s`. (The
    audio's own length says the same for audio.)"""


@dataclass(frozen=True)
class Deadline:
    at: float
    budget_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def check(self) -> None:
        now = time.monotonic()
        if now > self.at:
            elapsed = now - self.at + self.budget_s
            raise LimitExceeded(
                f"decoding took {elapsed:.1f} s, over the cap of {self.budget_s:g} s "
                f"({setting('max_decode_s')})"
            )


def setting(name: str) -> str:
    """How a user sets a sampling cap: the environment variable naming it."""
    return f"SYNTHWATCH_SAMPLE__{name.upper()}"


def mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def hms(seconds: float) -> str:
    """A duration as a person reads it: 4 h 10 min, 12 min 5 s, 42.0 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.1f} s"


def capped(width: int, height: int) -> tuple[int, int]:
    longest = max(width, height)
    if longest <= MAX_SIDE:
        return width, height
    scale = MAX_SIDE / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as exc:
        raise UnsupportedMedia(f"cannot read file: {exc.strerror}") from None


def target_times(start: float, duration: float, settings: SampleSettings) -> list[float]:
    """Target times, each in the middle of an equal slice of the duration."""
    if settings.seconds_per_frame:
        step = settings.seconds_per_frame
        count = max(1, math.ceil(duration / step - 0.5))
        if count <= settings.max_frames:
            return [start + step * (i + 0.5) for i in range(count)]
        # More than max_frames at that rate: spread max_frames over the whole item
        # rather than covering only its first part.
        count = settings.max_frames
    else:
        count = max(1, min(settings.frames, settings.max_frames))
    return [start + duration * (i + 0.5) / count for i in range(count)]
