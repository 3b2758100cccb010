"""Audio and video containers through PyAV (FFmpeg): probe, index, sample, redraw.

Restricted to the `file` protocol and to the demuxers in `AV_FORMATS`; see the package
docstring for the sampling strategies and the measurements behind them.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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

from synthwatch.errors import CorruptMedia, LimitExceeded, UnsupportedMedia
from synthwatch.models.speech import SAMPLE_RATE
from synthwatch.operators.sample.common import (
    Deadline,
    Frame,
    MediaInfo,
    Sampled,
    SampleSettings,
    StreamInfo,
    capped,
    hms,
    mpx,
    read_head,
    setting,
    target_times,
)

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


def _looks_like_av(head: bytes) -> bool:
    """Magic numbers of the accepted A/V containers: tells a broken file from a foreign one."""
    return (
        head[4:8] == b"ftyp"
        or head.startswith((b"\x1a\x45\xdf\xa3", b"ID3", b"fLaC", b"OggS", b"\x47"))
        or (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"))
        or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)  # MPEG audio/ADTS
        or head[4:8] in (b"moov", b"mdat", b"free", b"wide")  # QuickTime without ftyp
    )


@contextmanager
def av_errors() -> Iterator[None]:
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


def open_av(path: Path, settings: SampleSettings) -> InputContainer:
    head = read_head(path)
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


def av_info(container: InputContainer, settings: SampleSettings) -> MediaInfo:
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
                f"video is {width}x{height} ({mpx(width * height)}), over the cap of "
                f"{mpx(settings.max_pixels)} ({setting('max_pixels')}={settings.max_pixels}); "
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


def video_stream(container: InputContainer) -> VideoStream:
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
"""Codecs whose non-reference frames `Decoder.exact` may skip (each checked by a test
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


def index_packets(
    container: InputContainer, stream: VideoStream, settings: SampleSettings, deadline: Deadline
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


class Decoder:
    """Decodes one video stream forward, seeking only when a keyframe lies ahead."""

    def __init__(
        self,
        container: InputContainer,
        stream: VideoStream,
        index: _Index,
        settings: SampleSettings,
        deadline: Deadline,
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
        width, height = capped(frame.width, frame.height)
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


def sample_av(
    container: InputContainer, info: MediaInfo, settings: SampleSettings, deadline: Deadline
) -> Sampled:
    frames: list[Frame] = []
    notes: list[str] = []
    sampled_s: float | None = None
    keyframes = None
    strategy = "audio"
    duration_s = info.duration_s or 0.0
    if info.media_type == "video":
        stream = video_stream(container)
        index = index_packets(container, stream, settings, deadline)
        span_s = min(index.seconds(index.end - index.pts[0]), settings.max_duration_s)
        duration_s = info.duration_s or span_s
        if index.truncated:
            sampled_s = span_s
            total = f"{hms(duration_s)}" if duration_s > span_s else "a longer stream"
            notes.append(
                f"video: only the first {hms(span_s)} of {total} were sampled "
                f"(cap {setting('max_duration_s')}={settings.max_duration_s:g})"
            )
        targets = [
            index.pts_at(index.to_pts(t))
            for t in target_times(index.seconds(index.pts[0]), span_s, settings)
        ]
        decoder = Decoder(container, stream, index, settings, deadline)
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
            duration_s = len(audio) / SAMPLE_RATE
        if len(audio) >= settings.max_audio_s * SAMPLE_RATE and duration_s > settings.max_audio_s:
            notes.append(
                f"audio: only the first {hms(settings.max_audio_s)} of {hms(duration_s)} "
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
    decoder: Decoder, index: _Index, targets: Sequence[int]
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
    decoder: Decoder, index: _Index, targets: Sequence[int]
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
    container: InputContainer, stream: AudioStream, settings: SampleSettings, deadline: Deadline
) -> np.ndarray:
    limit = int(settings.max_audio_s * SAMPLE_RATE)
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
                resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
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
