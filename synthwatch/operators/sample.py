"""Probe a media file against allow-lists, then sample frames and audio from it cheaply.

`probe` says what a file is and refuses what the allow-lists do not name; `sample` draws
the frames and audio the detectors see; `frames_at` redraws frames at given times for
evidence. Audio and video go through PyAV (FFmpeg), restricted to the `file` protocol and
to the demuxers named below; stills and animated GIF/WebP go through Pillow, whose header
is read (and its pixel count checked) before any pixel is decoded.

Video sampling follows the measurements in shared/PERF_NOTES.md:

- `exact` mode ("smart seek"): one demux-only pass indexes every packet's timestamp and
  the keyframes, then each target is reached by decoding forward, seeking only when a
  keyframe lies between the current position and the target. Per-target seeking is 3.3x
  slower than full decode on long GOPs; this is never slower than full decode. Frames
  that nothing references and no target shows are not decoded on the way (40-45% of the
  decoding of an x264 stream with B-frames); every frame returned is the full decode's.
- `keyframes` mode: decode only the keyframe nearest each target (6x cheaper on short
  GOPs, approximate), then top up with exact frames so a clip that has the frames never
  yields fewer than asked.
- `adaptive` mode: a keyframe for each target that has its own within half the target
  spacing, exact frames for the rest: keyframes' cost on short GOPs, smart seek's on long
  ones, and always as many distinct frames as exact mode.
- One codec thread per decoder: the worker pool runs one item per thread, which beats
  codec threading, and frame threading slows keyframe-only decode.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import re
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import av
import av.error
import numpy as np
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import InputContainer
from av.packet import Packet
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from synthwatch.operators.errors import CorruptMedia, LimitExceeded, UnsupportedMedia
from synthwatch.operators.sniff import HEAD_BYTES, sniff
from synthwatch.pipeline.settings import SampleSettings

MediaType = Literal["video", "image", "audio"]

MAX_SIDE = 1920
"""Frames whose longest side exceeds this are downscaled (aspect kept) to bound memory:
a 16 x 8K RGB sample would be 1.6 GB. Evidence images are drawn from these frames."""

AUDIO_RATE = 16000

MAX_FRAME_RATE = 240
"""Frames per second no real video exceeds (phones' slow-motion capture tops out here).
With `max_duration_s` it bounds the frames a stream may claim or hold: indexing keeps a
timestamp per frame, and a crafted sample table can claim billions at no cost in bytes."""

# FFmpeg demuxer names, passed to FFmpeg as `format_whitelist`. Deliberately absent:
# hls, dash, concat and the playlist/manifest demuxers (they open other files and URLs);
# image2 (expands %d and glob patterns into other files); tty, lavfi and devices; and
# the long tail of legacy formats whose demuxers see little fuzzing. Stills and animated
# images are decoded by Pillow, so no image demuxer is needed here.
AV_FORMATS: frozenset[str] = frozenset(
    {
        "mov", "mp4", "m4a", "3gp", "3g2", "mj2",  # ISO BMFF, one demuxer
        "matroska", "webm",
        "avi",
        "mpegts",
        "mp3", "wav", "flac", "ogg", "aac",
    }
)  # fmt: skip

# Canonical codec names (`Codec.canonical_name`, independent of which decoder FFmpeg picks).
VIDEO_CODECS: frozenset[str] = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
AUDIO_CODECS: frozenset[str] = frozenset(
    {
        "aac", "mp3", "mp2", "opus", "vorbis", "flac", "alac", "ac3", "eac3",
        "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_u8",
    }
)  # fmt: skip

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


# --------------------------------------------------------------------------- public API


def probe(path: Path, settings: SampleSettings) -> MediaInfo:
    """Identify `path` and check it against the allow-lists and caps, decoding no pixels.

    Raises UnsupportedMedia (unknown or refused format, codec, playlist), CorruptMedia
    (a format we accept that does not parse), LimitExceeded (streams, pixels, duration,
    animation frames).
    """
    path = Path(path)
    head = _read_head(path)
    if _looks_like_image(head):
        with _open_image(path, head, settings) as image:
            return _image_info(image, settings)
    with _open_av(path, settings) as container, _av_errors():
        return _av_info(container, settings)


def sample(path: Path, settings: SampleSettings, *, media_type: str | None = None) -> Sampled:
    """Sample frames (and audio) from `path` as `settings` ask.

    `media_type` is what the caller's sniffing expected; an image where audio/video was
    expected, or the reverse, is refused, because a file that parses as two things is
    how a polyglot slips past one parser into another.

    Raises UnsupportedMedia, CorruptMedia, LimitExceeded (including `max_decode_s`).
    """
    path = Path(path)
    deadline = _Deadline.after(settings.max_decode_s)
    head = _read_head(path)
    if _looks_like_image(head):
        if media_type not in (None, "image", "video"):
            raise UnsupportedMedia(f"expected {media_type}, found an image")
        with _open_image(path, head, settings) as image:
            info = _image_info(image, settings)
            return _sample_image(image, info, settings, deadline)
    if media_type == "image":
        raise UnsupportedMedia("expected an image, found audio/video")
    with _open_av(path, settings) as container, _av_errors():
        info = _av_info(container, settings)
        return _sample_av(container, info, settings, deadline)


def frames_at(path: Path, times_s: list[float], settings: SampleSettings) -> list[Frame]:
    """Decode the frame displayed at each time in `times_s`, one Frame per time, in order.

    A still answers every time with its one image; an animation with the frame showing
    at that time. Raises like `sample`; an audio-only file has no frames (UnsupportedMedia).
    """
    path = Path(path)
    deadline = _Deadline.after(settings.max_decode_s)
    if not times_s:
        return []
    head = _read_head(path)
    if _looks_like_image(head):
        with _open_image(path, head, settings) as image:
            info = _image_info(image, settings)
            with _image_errors(settings):
                return _image_frames_at(image, info, times_s, settings, deadline)
    with _open_av(path, settings) as container, _av_errors():
        info = _av_info(container, settings)
        if info.media_type != "video":
            raise UnsupportedMedia("no video stream to draw frames from")
        stream = _video_stream(container)
        index = _index_packets(container, stream, settings, deadline)
        decoder = _Decoder(container, stream, index, settings, deadline)
        picks = [index.pts_at(index.to_pts(t)) for t in times_s]
        decoder.wanted(picks)
        decoded = {pts: decoder.exact(pts) for pts in sorted(set(picks))}
        return [Frame(i, *decoded[pts]) for i, pts in enumerate(picks)]


# --------------------------------------------------------------------------- sniffing


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as exc:
        raise UnsupportedMedia(f"cannot read file: {exc.strerror}") from None


def _looks_like_image(head: bytes) -> bool:
    """The same judgement as fetch's: an image goes to Pillow, anything else to PyAV."""
    found = sniff(head)
    return found is not None and found[1] == "image"


def _looks_like_av(head: bytes) -> bool:
    """Magic numbers of the accepted A/V containers: tells a broken file from a foreign one."""
    return (
        head[4:8] == b"ftyp"
        or head.startswith((b"\x1a\x45\xdf\xa3", b"ID3", b"fLaC", b"OggS", b"\x47"))
        or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"))
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # MPEG audio/ADTS
        or head[4:8] in (b"moov", b"mdat", b"free", b"wide")  # QuickTime without ftyp
    )


# --------------------------------------------------------------------------- PyAV side


@contextmanager
def _av_errors() -> Iterator[None]:
    """Turn FFmpeg failures after a successful open into the project's error types."""
    try:
        yield
    except av.error.MemoryError:
        raise LimitExceeded("decoder ran out of memory") from None
    except av.error.FFmpegError as exc:
        raise CorruptMedia(f"decode failed: {_strerror(exc)}") from None


def _strerror(exc: BaseException) -> str:
    # FFmpeg messages name the file; a DLQ reason must not leak local paths.
    return str(getattr(exc, "strerror", None) or type(exc).__name__)


def _open_av(path: Path, settings: SampleSettings) -> InputContainer:
    head = _read_head(path)
    container_options = {
        # The `file` protocol only, and only the demuxers named above: a playlist or
        # concat list is refused before it can open another file or a URL. The
        # protocol list alone is not enough: an HLS playlist naming local files opens.
        "protocol_whitelist": "file",
        "format_whitelist": ",".join(sorted(AV_FORMATS)),
        # mov can follow "data references" to other files; off by default, kept off.
        "enable_drefs": "0",
        # One more stream than allowed, so a file over the cap is seen and reported
        # rather than silently truncated to the cap by the demuxer.
        "max_streams": str(settings.max_streams + 1),
    }
    try:
        # "file:" makes a name like "concat:a|b" or "http:x" a plain file name.
        return av.open(
            "file:" + str(path.resolve()),
            mode="r",
            container_options=container_options,
            metadata_errors="ignore",
        )
    except av.error.MemoryError:
        raise LimitExceeded("too many streams or too large to open") from None
    except (av.error.ArgumentError, av.error.PermissionError, av.error.ProtocolNotFoundError):
        raise UnsupportedMedia("container format or protocol not accepted") from None
    except av.error.FFmpegError as exc:
        if _looks_like_av(head):
            raise CorruptMedia(f"truncated or corrupt container: {_strerror(exc)}") from None
        raise UnsupportedMedia("not a media format we accept") from None


def _av_info(container: InputContainer, settings: SampleSettings) -> MediaInfo:
    fmt = container.format.name
    if not set(fmt.split(",")) & AV_FORMATS:  # format_whitelist already refused it
        raise UnsupportedMedia(f"container {fmt} not accepted")
    if len(container.streams) > settings.max_streams:
        raise LimitExceeded(
            f"more than {settings.max_streams} streams, the cap ({setting('max_streams')}="
            f"{settings.max_streams})"
        )
    streams: list[StreamInfo] = []
    video: VideoStream | None = None
    audio: AudioStream | None = None
    for stream in container.streams:
        codec = _codec_name(stream)
        attached = bool(stream.disposition & Disposition.attached_pic)
        streams.append(StreamInfo(stream.index, stream.type, codec, attached))
        if isinstance(stream, VideoStream) and not attached:
            if codec not in VIDEO_CODECS:
                raise UnsupportedMedia(f"video codec {codec} not accepted")
            video = video or stream
        elif isinstance(stream, AudioStream):
            if codec not in AUDIO_CODECS:
                raise UnsupportedMedia(f"audio codec {codec} not accepted")
            audio = audio or stream
    if video is None and audio is None:
        raise UnsupportedMedia("no audio or video stream")

    # A duration over `max_duration_s` is not refused: sampling reads only its first
    # `max_duration_s` seconds (and says so), which bounds the index and the decode.
    duration_s = None
    if container.duration is not None and container.duration > 0:
        duration_s = container.duration / av.time_base

    width = height = 0
    frame_rate = None
    frame_count = None
    if video is not None:
        width, height = video.codec_context.width, video.codec_context.height
        if width <= 0 or height <= 0:
            raise CorruptMedia("video stream without dimensions")
        if width * height > settings.max_pixels:
            raise LimitExceeded(
                f"video is {width}x{height} ({_mpx(width * height)}), over the cap of "
                f"{_mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels}); "
                "video frames cannot be decoded at a reduced size"
            )
        rate = video.average_rate or video.guessed_rate
        frame_rate = float(rate) if rate else None
        frame_count = video.frames or None
        within = duration_s is None or duration_s <= settings.max_duration_s
        if frame_count is not None and within and frame_count > _frame_cap(settings):
            # More frames than its duration can hold at any real frame rate: a lie.
            raise LimitExceeded(_too_many_frames(frame_count, settings))
    return MediaInfo(
        media_type="video" if video is not None else "audio",
        container=fmt,
        streams=tuple(streams),
        video_codec=_codec_name(video) if video is not None else None,
        audio_codec=_codec_name(audio) if audio is not None else None,
        duration_s=duration_s,
        width=width,
        height=height,
        frame_rate=frame_rate,
        frame_count=frame_count,
    )


def _codec_name(stream: av.stream.Stream) -> str | None:
    try:
        return stream.codec_context.codec.canonical_name
    except Exception:  # data/attachment streams have no decoder
        return None


def _video_stream(container: InputContainer) -> VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    raise UnsupportedMedia("no video stream")


@dataclass
class _Index:
    """Every packet's timestamp and the keyframes of one video stream, from demuxing alone."""

    time_base: float
    pts: list[int]
    """Sorted presentation timestamps of all frames."""
    keyframes: list[int]
    """Sorted presentation timestamps of the keyframes."""
    end: int
    """Timestamp just past the last frame."""
    truncated: bool = False
    """The stream goes on past `max_duration_s`; only its first part is indexed."""

    def to_pts(self, seconds: float) -> int:
        return math.floor(seconds / self.time_base + 1e-6)

    def seconds(self, pts: int) -> float:
        return pts * self.time_base

    def pts_at(self, target: int) -> int:
        """The frame displayed at `target`: the last one starting at or before it."""
        i = bisect.bisect_right(self.pts, target)
        return self.pts[max(0, i - 1)]

    def keyframe_before(self, target: int) -> int | None:
        i = bisect.bisect_right(self.keyframes, target)
        return self.keyframes[i - 1] if i else None

    def nearest_keyframe(self, target: int) -> int:
        i = bisect.bisect_left(self.keyframes, target)
        near = self.keyframes[max(0, i - 1) : i + 1]
        return min(near, key=lambda k: abs(k - target))


_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "vp8", "vp9"})
"""Codecs whose non-reference frames `_Decoder.exact` may skip (each checked by a test
against a full decode, with B-frames, alt-ref or open GOPs as their encoders make them)."""

_PHANTOM_FRAMES = 1000
"""Frames a sample table may name beyond twice those present (a cut-off download)."""


def _frame_cap(settings: SampleSettings) -> int:
    return math.ceil(settings.max_duration_s * MAX_FRAME_RATE)


def _too_many_frames(count: int | str, settings: SampleSettings) -> str:
    return (
        f"video stream has {count} frames, over the {_frame_cap(settings)} that "
        f"{setting('max_duration_s')}={settings.max_duration_s:g} allows at "
        f"{MAX_FRAME_RATE} fps"
    )


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def _hms(seconds: float) -> str:
    """A duration as a person reads it: 4 h 10 min, 12 min 5 s, 42.0 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.1f} s"


def _index_packets(
    container: InputContainer, stream: VideoStream, settings: SampleSettings, deadline: _Deadline
) -> _Index:
    """Index the video stream's first `max_duration_s` seconds (all of it when shorter):
    packets past that are not read, so a long recording costs what its cap allows."""
    if stream.time_base is None:
        raise CorruptMedia("video stream without a time base")
    cap = _frame_cap(settings)
    horizon: int | None = None  # pts past which packets are not indexed
    all_pts: list[int] = []
    keyframes: list[int] = []
    end = 0
    truncated = False
    for n, packet in enumerate(container.demux(stream)):
        if n % 256 == 0:
            deadline.check()
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or packet.size == 0:
            continue
        if horizon is None:
            horizon = ts + math.floor(settings.max_duration_s / float(stream.time_base))
        if ts >= horizon:
            # Packets come in decode order, so a few B-frames of the window may follow
            # the first packet past it; one GOP's worth of slack finds them.
            if ts >= horizon + math.ceil(10.0 / float(stream.time_base)):
                truncated = True
                break
            truncated = True
            continue
        if len(all_pts) >= cap:
            raise LimitExceeded(_too_many_frames(f"more than {cap}", settings))
        all_pts.append(ts)
        if packet.is_keyframe:
            keyframes.append(ts)
        end = max(end, ts + (packet.duration or 0))
    if not all_pts:
        raise CorruptMedia("video stream has no frames")
    # A sample table naming many more frames than the file holds is not a truncated
    # download (that loses at most what is missing) but a lie, and FFmpeg's seek then
    # walks every phantom entry, for minutes, in C where no deadline check can reach.
    # (An index cut at the duration cap holds only the frames of its window.)
    if not truncated and stream.frames > 2 * len(all_pts) + _PHANTOM_FRAMES:
        raise CorruptMedia(f"container names {stream.frames} frames, holds {len(all_pts)}")
    all_pts.sort()
    end = max(end, all_pts[-1] + 1)
    # A stream whose first packet is not flagged key still decodes from its start.
    keyframes = sorted(set(keyframes) | {all_pts[0]})
    return _Index(float(stream.time_base), all_pts, keyframes, end, truncated)


class _Decoder:
    """Decodes one video stream forward, seeking only when a keyframe lies ahead."""

    def __init__(
        self,
        container: InputContainer,
        stream: VideoStream,
        index: _Index,
        settings: SampleSettings,
        deadline: _Deadline,
    ) -> None:
        self._container = container
        self._stream = stream
        self._index = index
        self._deadline = deadline
        self._packets: Iterator[Packet[VideoStream]] | None = None
        self._pending: deque[VideoFrame] = deque()
        self._position: int | None = None  # pts of the last frame handed out
        self._reformatter = VideoReformatter()  # one per decoder: it caches its scaler
        self._keep: frozenset[int] = frozenset()
        self._skipping = False
        # AVI stores no presentation times: FFmpeg labels its packets, and so its frames,
        # by decode order, which mislabels every B-frame. Frames leave the decoder in
        # display order, so there the k-th frame out since the start is labelled with the
        # k-th timestamp of the index, decoding forward from the start only.
        self.renumbers = "avi" in container.format.name.split(",")
        self._shown = 0
        self._may_skip = _codec_name(stream) in _SKIP_NONREF_CODECS and not self.renumbers
        ctx = stream.codec_context
        ctx.thread_count = 1
        ctx.thread_type = "SLICE"
        # The header's size was checked; this stops a later in-stream size change.
        ctx.options = {"max_pixels": str(settings.max_pixels)}
        self.seeks = 0

    # -- exact --------------------------------------------------------------------------

    def wanted(self, targets: Sequence[int]) -> None:
        """Announce every target `exact` will be asked for, so that on the way to one it
        decodes the others it passes (B-frames arrive out of display order)."""
        self._keep = frozenset(targets)

    def exact(self, target: int) -> tuple[float, np.ndarray]:
        """The frame displayed at `target` (a pts from the index).

        On the way to it, frames that no other frame references (nal_ref_idc 0 in H.264,
        VP9 frames that refresh no reference slot) are not decoded unless they are a
        wanted target: the frames returned are the full decode's to the bit, and on
        x264's default B-frames about 40% of the decoding is saved. Only where that was
        checked frame by frame against a full decode (`_SKIP_NONREF_CODECS`, not in AVI,
        whose packets carry no presentation times): with dav1d, skipping shifted AV1
        frames by one, and MPEG-4 Part 2 was not verified.
        """
        self._skipping = self._may_skip
        try:
            return self._exact(target)
        finally:
            self._skipping = False
            self._stream.codec_context.skip_frame = "DEFAULT"

    def _exact(self, target: int) -> tuple[float, np.ndarray]:
        keyframe = self._index.keyframe_before(target)
        if keyframe is None or self.renumbers:
            keyframe = self._index.keyframes[0]
        if (
            self._packets is None
            or self._position is None
            or target <= self._position
            or keyframe > self._position
        ):
            self._seek(keyframe)
        previous: VideoFrame | None = None
        while True:
            frame = self._next_frame()
            if frame is None:  # past the end: the last frame is what shows
                if previous is None:
                    raise CorruptMedia("no decodable frame near the target")
                return self._convert(previous)
            pts = frame.pts
            if pts is None:
                continue
            self._position = pts
            if pts == target:
                return self._convert(frame)
            if pts > target:
                if previous is not None:
                    self._pending.appendleft(frame)
                    self._position = previous.pts
                    return self._convert(previous)
                # Landed after the target: open-GOP HEVC drops the leading pictures
                # after a seek. Step back one keyframe and try again.
                earlier = self._index.keyframe_before(keyframe - 1)
                if earlier is None:
                    return self._convert(frame)  # a full decode shows this frame too
                keyframe = earlier
                self._seek(keyframe)
                continue
            previous = frame

    # -- keyframes ----------------------------------------------------------------------

    def keyframe(self, keyframe: int) -> tuple[float, np.ndarray] | None:
        """Decode the keyframe at pts `keyframe` alone; None when it yields no key frame."""
        ctx = self._stream.codec_context
        ctx.skip_frame = "NONKEY"
        try:
            self._seek(keyframe)
            assert self._packets is not None
            for n, packet in enumerate(self._packets):
                if n % 64 == 0:
                    self._deadline.check()
                ts = packet.pts if packet.pts is not None else packet.dts
                # Only key packets reach the decoder: VP9 ignores NONKEY and would
                # decode every frame otherwise.
                if packet.size == 0 or not packet.is_keyframe or ts is None or ts < keyframe:
                    continue
                frames = ctx.decode(packet) or ctx.decode(None)  # drain a reordering delay
                for frame in frames:
                    if frame.key_frame:
                        return self._convert(frame)
                return None
            return None
        finally:
            ctx.flush_buffers()
            ctx.skip_frame = "DEFAULT"
            self._packets = None  # the next exact() seeks afresh
            self._position = None

    # -- plumbing -----------------------------------------------------------------------

    def _seek(self, pts: int) -> None:
        self._deadline.check()
        self._container.seek(pts, backward=True, any_frame=False, stream=self._stream)
        self.seeks += 1
        self._pending.clear()
        self._packets = self._container.demux(self._stream)
        self._position = None
        self._shown = 0

    def _next_frame(self) -> VideoFrame | None:
        while not self._pending:
            assert self._packets is not None
            self._deadline.check()
            packet = next(self._packets, None)
            if packet is None:
                return None
            ctx = self._stream.codec_context
            if self._skipping:
                # Read per packet by the decoder as it parses it (one codec thread, no
                # frame threading), so a wanted frame is never skipped.
                ts = packet.pts
                ctx.skip_frame = "DEFAULT" if ts is None or ts in self._keep else "NONREF"
            # PyAV ends demux with an empty packet, which drains the decoder.
            frames = ctx.decode(packet)
            if self.renumbers:
                for frame in frames:
                    frame.pts = self._index.pts[min(self._shown, len(self._index.pts) - 1)]
                    self._shown += 1
            self._pending.extend(frames)
        return self._pending.popleft()

    def _convert(self, frame: VideoFrame) -> tuple[float, np.ndarray]:
        width, height = _capped(frame.width, frame.height)
        rgb = self._reformatter.reformat(
            frame,
            width=width,
            height=height,
            format="rgb24",
            interpolation="AREA" if width != frame.width else None,
            threads=1,
        )
        image: np.ndarray = rgb.to_ndarray()
        # Phone videos carry their orientation as a display matrix, not rotated pixels.
        quarter_turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
        if quarter_turns:
            image = np.ascontiguousarray(np.rot90(image, quarter_turns))
        return self._index.seconds(frame.pts or 0), image


def _capped(width: int, height: int) -> tuple[int, int]:
    longest = max(width, height)
    if longest <= MAX_SIDE:
        return width, height
    scale = MAX_SIDE / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _targets(start: float, duration: float, settings: SampleSettings) -> list[float]:
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


def _sample_av(
    container: InputContainer, info: MediaInfo, settings: SampleSettings, deadline: _Deadline
) -> Sampled:
    frames: list[Frame] = []
    notes: list[str] = []
    sampled_s: float | None = None
    keyframes = None
    strategy = "audio"
    duration_s = info.duration_s or 0.0
    if info.media_type == "video":
        stream = _video_stream(container)
        index = _index_packets(container, stream, settings, deadline)
        span_s = min(index.seconds(index.end - index.pts[0]), settings.max_duration_s)
        duration_s = info.duration_s or span_s
        if index.truncated:
            sampled_s = span_s
            total = f"{_hms(duration_s)}" if duration_s > span_s else "a longer stream"
            notes.append(
                f"video: only the first {_hms(span_s)} of {total} were sampled "
                f"(cap {setting('max_duration_s')}={settings.max_duration_s:g})"
            )
        targets = [
            index.pts_at(index.to_pts(t))
            for t in _targets(index.seconds(index.pts[0]), span_s, settings)
        ]
        decoder = _Decoder(container, stream, index, settings, deadline)
        decoder.wanted(targets)
        if decoder.renumbers:  # AVI: keyframes carry decode-order labels, so no shortcut
            decoded = {pts: decoder.exact(pts) for pts in sorted(set(targets))}
            strategy = "sequential"
        elif settings.mode == "keyframes":
            decoded, strategy = _sample_keyframes(decoder, index, targets)
        elif settings.mode == "adaptive":
            decoded, strategy = _sample_adaptive(decoder, index, targets)
        else:
            decoded = {pts: decoder.exact(pts) for pts in sorted(set(targets))}
            strategy = "smart-seek"
        frames = [
            Frame(i, t, image) for i, (t, image) in enumerate(decoded[k] for k in sorted(decoded))
        ]
        keyframes = len(index.keyframes)
    audio = None
    if settings.audio and container.streams.audio:
        audio = _decode_audio(container, container.streams.audio[0], settings, deadline)
        if info.media_type == "audio" and not duration_s:
            duration_s = len(audio) / AUDIO_RATE
        if len(audio) >= settings.max_audio_s * AUDIO_RATE and duration_s > settings.max_audio_s:
            notes.append(
                f"audio: only the first {_hms(settings.max_audio_s)} of {_hms(duration_s)} "
                f"were decoded (cap {setting('max_audio_s')}={settings.max_audio_s:g})"
            )
    return Sampled(
        media_type=info.media_type,
        frames=frames,
        audio=audio,
        duration_s=duration_s,
        width=info.width,
        height=info.height,
        container=info.container,
        video_codec=info.video_codec,
        audio_codec=info.audio_codec,
        keyframes=keyframes,
        strategy=strategy,
        notes=notes,
        sampled_s=sampled_s,
    )


def _sample_keyframes(
    decoder: _Decoder, index: _Index, targets: Sequence[int]
) -> tuple[dict[int, tuple[float, np.ndarray]], str]:
    """Nearest keyframe per target; exact frames fill in when keyframes are too few.

    Targets are distinct frames of the clip, so `len(set(targets))` frames exist; of the
    exact frames for the targets, at most one per keyframe can coincide with a keyframe
    already taken, so filling from them always reaches the count.
    """
    wanted = len(set(targets))
    chosen: dict[int, int] = {}  # keyframe pts -> the first target it serves
    for target in targets:
        chosen.setdefault(index.nearest_keyframe(target), target)
    decoded: dict[int, tuple[float, np.ndarray]] = {}
    served: set[int] = set()
    for keyframe in sorted(chosen):
        result = decoder.keyframe(keyframe)
        if result is not None:
            decoded[keyframe] = result
            served.add(chosen[keyframe])
    if len(decoded) >= wanted:
        return decoded, "keyframes"
    # Targets whose keyframe was shared go first; they are the gaps in the coverage.
    unserved = sorted(t for t in set(targets) if t not in served and t not in decoded)
    rest = sorted(t for t in set(targets) if t in served and t not in decoded)
    for batch in (unserved, rest):
        for target in batch:
            if len(decoded) >= wanted:
                break
            if target not in decoded:
                decoded[target] = decoder.exact(target)
    return decoded, "keyframes+exact"


def _sample_adaptive(
    decoder: _Decoder, index: _Index, targets: Sequence[int]
) -> tuple[dict[int, tuple[float, np.ndarray]], str]:
    """A keyframe for each target that has one of its own close by, exact frames for the rest.

    "Close by" is within half the spacing of the targets, so each frame still lies in the
    slice of the duration its target stands for, and no two targets share a keyframe:
    the frames are as many, as distinct and as evenly spread as exact mode's. Short GOPs
    serve every target from keyframes (one seek and one frame each, 6x cheaper than
    smart seek); long GOPs serve few, and those go exact too when the exact pass decodes
    through them anyway, so the cost stays near smart seek's.
    """
    wanted = sorted(set(targets))
    if len(wanted) > 1:
        spacing = min(b - a for a, b in itertools.pairwise(wanted))
    else:
        spacing = index.end - index.pts[0]
    tolerance = spacing / 2
    # Best matches claim their keyframe first, so a target sitting on a keyframe gets it.
    claims = sorted((abs(index.nearest_keyframe(t) - t), t) for t in wanted)
    by_keyframe: dict[int, int] = {}  # keyframe pts -> the target it serves
    for error, target in claims:
        keyframe = index.nearest_keyframe(target)
        if error <= tolerance and keyframe not in by_keyframe:
            by_keyframe[keyframe] = target
    exact = {t for t in wanted if t not in by_keyframe.values()}
    # A target the exact pass decodes through on its way to a later one in the same GOP
    # costs nothing extra exact; a keyframe decode would cost a seek and a frame.
    gop_ends: dict[int | None, int] = {}
    for target in exact:
        gop = index.keyframe_before(target)
        gop_ends[gop] = max(target, gop_ends.get(gop, target))
    for keyframe, target in list(by_keyframe.items()):
        if target < gop_ends.get(index.keyframe_before(target), target):
            del by_keyframe[keyframe]
            exact.add(target)
    decoded: dict[int, tuple[float, np.ndarray]] = {}
    for keyframe in sorted(by_keyframe):
        result = decoder.keyframe(keyframe)
        if result is None:  # no decodable key picture there: take the exact frame
            exact.add(by_keyframe[keyframe])
        else:
            decoded[keyframe] = result
    # Keyframes first, then the exact targets in order, so smart seek decodes forward.
    decoder.wanted(sorted(exact))
    for target in sorted(exact):
        decoded[target] = decoder.exact(target)
    if not exact:
        return decoded, "keyframes"
    return decoded, "smart-seek" if len(exact) == len(wanted) else "keyframes+exact"


def _decode_audio(
    container: InputContainer, stream: AudioStream, settings: SampleSettings, deadline: _Deadline
) -> np.ndarray:
    limit = int(settings.max_audio_s * AUDIO_RATE)
    if container.streams.video:  # the video pass left the demuxer at the end
        container.seek(0)
    stream.codec_context.thread_count = 1
    resampler: av.AudioResampler | None = None
    source: tuple[str, str, int] | None = None  # the input the resampler is set up for
    chunks: list[np.ndarray] = []
    total = 0
    for n, packet in enumerate(container.demux(stream)):
        if n % 64 == 0:
            deadline.check()
        for frame in packet.decode():
            out: list[AudioFrame] = []
            # A stream can change rate, layout or sample format midway (spliced
            # broadcasts, concatenated MP3s, hostile files); a resampler takes one input.
            shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            if resampler is None or shape != source:
                if resampler is not None:
                    out += resampler.resample(None)
                resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
                source = shape
            out += resampler.resample(frame)
            for resampled in out:
                chunks.append(resampled.to_ndarray().reshape(-1))
                total += resampled.samples
        if total >= limit:
            break
    else:
        if resampler is not None:
            for resampled in resampler.resample(None):
                chunks.append(resampled.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks)[:limit].astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Deadline:
    at: float
    budget_s: float

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
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


# --------------------------------------------------------------------------- Pillow side


# What Pillow raises on a broken file: truncation is OSError, a bad header often
# SyntaxError; the GIF plugin indexes past the end of a truncated block (IndexError).
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@contextmanager
def _image_errors(settings: SampleSettings) -> Iterator[None]:
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
    size = f"{_mpx(int(found.group(1)))} " if found else ""
    return (
        f"image of {size}is over the cap of {_mpx(settings.max_pixels)} "
        f"({setting('max_pixels')}={settings.max_pixels})"
    )


def register_plugins() -> None:
    """Every Pillow plugin we accept, HEIF's too when its optional package is installed."""
    Image.init()  # registers WEBP; Image.open only preloads a few plugins by itself
    with contextlib.suppress(ImportError):
        import pillow_heif

        pillow_heif.register_heif_opener()


def _open_image(path: Path, head: bytes, settings: SampleSettings) -> Image.Image:
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
        f"image is {width}x{height} ({_mpx(pixels)}), over the cap of "
        f"{_mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels})"
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


def _image_info(image: Image.Image, settings: SampleSettings) -> MediaInfo:
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
    with _image_errors(settings):
        return int(getattr(image, "n_frames", 1))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not sink an otherwise good image
        return 1


def _image_array(image: Image.Image, orientation: int) -> np.ndarray:
    rgb = image.convert("RGB")
    if max(rgb.size) > MAX_SIDE:
        rgb = rgb.resize(_capped(*rgb.size), Image.Resampling.BOX)
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
            f"({_mpx(width * height)}), over the cap of {_mpx(settings.max_pixels)} "
            f"({setting('max_pixels')}={settings.max_pixels})"
        )


def _animation_timeline(
    image: Image.Image, settings: SampleSettings, deadline: _Deadline
) -> _Animation:
    """Start time of each frame, of the first `max_image_frames` frames at most."""
    timeline = _Animation()
    elapsed_ms = 0  # whole milliseconds, so times do not drift by float rounding
    for i in range(min(_frame_count(image, settings), settings.max_image_frames)):
        deadline.check()
        _seek(image, i, settings)
        duration_ms = round(float(image.info.get("duration") or 0))
        timeline.starts_s.append(elapsed_ms / 1000)
        # Browsers show frames of 10 ms or less for 100 ms; so do we.
        elapsed_ms += duration_ms if duration_ms > 10 else 100
    timeline.duration_s = elapsed_ms / 1000
    return timeline


def _sample_image(
    image: Image.Image, info: MediaInfo, settings: SampleSettings, deadline: _Deadline
) -> Sampled:
    notes: list[str] = []
    with _image_errors(settings):
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
                    f"({_hms(timeline.duration_s)}) were sampled (cap "
                    f"{setting('max_image_frames')}={settings.max_image_frames})"
                )
            targets = _targets(0.0, timeline.duration_s, settings)
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
    request = _capped(width, height)
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
        f"image: {width}x{height} ({_mpx(width * height)}) is over the cap of "
        f"{_mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels}); "
        f"decoded at {image.size[0]}x{image.size[1]}"
    )


def _animation_frame(timeline: _Animation, t: float) -> int:
    return max(0, bisect.bisect_right(timeline.starts_s, t + 1e-9) - 1)


def _image_frames_at(
    image: Image.Image,
    info: MediaInfo,
    times_s: list[float],
    settings: SampleSettings,
    deadline: _Deadline,
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
