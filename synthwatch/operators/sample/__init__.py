"""Probe a media file against allow-lists, then sample frames and audio from it cheaply.

`probe` says what a file is and refuses what the allow-lists do not name; `sample` draws
the frames and audio the detectors see; `frames_at` redraws frames at given times for
evidence. One module per container family: `video` (audio and video through PyAV,
restricted to the `file` protocol and to the demuxers it names) and `images` (stills and
animations through Pillow, whose header is read, and its pixel count checked, before any
pixel is decoded); `common` holds the settings, records and caps both share.

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

from pathlib import Path

from synthwatch.errors import UnsupportedMedia
from synthwatch.operators.sample.common import (
    MAX_SIDE,
    Deadline,
    Frame,
    MediaInfo,
    Sampled,
    SampleSettings,
    StreamInfo,
    read_head,
    setting,
)
from synthwatch.operators.sniff import sniff

__all__ = [
    "MAX_SIDE",
    "Frame",
    "MediaInfo",
    "SampleSettings",
    "Sampled",
    "StreamInfo",
    "frames_at",
    "probe",
    "register_plugins",
    "sample",
    "setting",
]


def probe(path: Path, settings: SampleSettings) -> MediaInfo:
    """Identify `path` and check it against the allow-lists and caps, decoding no pixels.

    Raises UnsupportedMedia (unknown or refused format, codec, playlist), CorruptMedia
    (a format we accept that does not parse), LimitExceeded (streams, pixels, duration,
    animation frames).
    """
    from synthwatch.operators.sample import images, video

    path = Path(path)
    head = read_head(path)
    if _looks_like_image(head):
        with images.open_image(path, head, settings) as image:
            return images.image_info(image, settings)
    with video.open_av(path, settings) as container, video.av_errors():
        return video.av_info(container, settings)


def sample(path: Path, settings: SampleSettings, *, media_type: str | None = None) -> Sampled:
    """Sample frames (and audio) from `path` as `settings` ask.

    `media_type` is what the caller's sniffing expected; an image where audio/video was
    expected, or the reverse, is refused, because a file that parses as two things is
    how a polyglot slips past one parser into another.

    Raises UnsupportedMedia, CorruptMedia, LimitExceeded (including `max_decode_s`).
    """
    from synthwatch.operators.sample import images, video

    path = Path(path)
    deadline = Deadline.after(settings.max_decode_s)
    head = read_head(path)
    if _looks_like_image(head):
        if media_type not in (None, "image", "video"):
            raise UnsupportedMedia(f"expected {media_type}, found an image")
        with images.open_image(path, head, settings) as image:
            info = images.image_info(image, settings)
            return images.sample_image(image, info, settings, deadline)
    if media_type == "image":
        raise UnsupportedMedia("expected an image, found audio/video")
    with video.open_av(path, settings) as container, video.av_errors():
        info = video.av_info(container, settings)
        return video.sample_av(container, info, settings, deadline)


def frames_at(path: Path, times_s: list[float], settings: SampleSettings) -> list[Frame]:
    """Decode the frame displayed at each time in `times_s`, one Frame per time, in order.

    A still answers every time with its one image; an animation with the frame showing
    at that time. Raises like `sample`; an audio-only file has no frames (UnsupportedMedia).
    """
    from synthwatch.operators.sample import images, video

    path = Path(path)
    deadline = Deadline.after(settings.max_decode_s)
    if not times_s:
        return []
    head = read_head(path)
    if _looks_like_image(head):
        with images.open_image(path, head, settings) as image:
            info = images.image_info(image, settings)
            with images.image_errors(settings):
                return images.image_frames_at(image, info, times_s, settings, deadline)
    with video.open_av(path, settings) as container, video.av_errors():
        info = video.av_info(container, settings)
        if info.media_type != "video":
            raise UnsupportedMedia("no video stream to draw frames from")
        stream = video.video_stream(container)
        index = video.index_packets(container, stream, settings, deadline)
        decoder = video.Decoder(container, stream, index, settings, deadline)
        picks = [index.pts_at(index.to_pts(t)) for t in times_s]
        decoder.wanted(picks)
        decoded = {pts: decoder.exact(pts) for pts in sorted(set(picks))}
        return [Frame(i, *decoded[pts]) for i, pts in enumerate(picks)]


def _looks_like_image(head: bytes) -> bool:
    """The same judgement as fetch's: an image goes to Pillow, anything else to PyAV."""
    found = sniff(head)
    return found is not None and found[1] == "image"


def register_plugins() -> None:
    """Load both decoders now (PyAV; Pillow with every plugin we accept, HEIF's when its
    optional package is installed), not on the first item: the sandbox's children call
    it before their memory cap is set. Importing this package alone loads neither, so
    settings and records cost no decoder start-up."""
    from synthwatch.operators.sample import images
    from synthwatch.operators.sample import video as _video  # noqa: F401  (PyAV)

    images.register_plugins()
