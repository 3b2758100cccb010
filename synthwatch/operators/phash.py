"""Perceptual hashes of what was scanned: PDQ for every still and every sampled video frame.

PDQ (Meta's photo hash; the format ThreatExchange and hasher-matcher-actioner exchange)
turns an image into 256 bits that change little under re-encoding, resizing and small
crops, and a quality from 0 to 100 saying how much structure the image has. Facts from
the PDQ description in facebook/ThreatExchange (pdq/README and hashing.pdf): two images
are taken as the same when their hashes differ in at most 31 of the 256 bits, and a
hash of quality under 50 (a flat or nearly blank image) should not be matched on.
The hashing itself is the `pdqhash` package (Cython bindings to Meta's C++ reference
implementation), so our hashes are the exchange's hashes, bit for bit.

Measured on scikit-image's astronaut photo (tests/unit/test_phash.py): a JPEG at quality
60 moves 2 bits, half the size 12, 1% cut off each side 18; 2% off each side moves 34,
past the threshold: PDQ matches re-encodes and resizes, and only slight crops.

Every hash is recorded in the verdict (`Verdict.hashes`, hex as ThreatExchange writes
it), with the quality and, for video, the frame's time, so a match found later can be
traced to the frame it came from.

vPDQ (`vpdq_file`) is Meta's video hash, reimplemented here from its published
description (facebook/ThreatExchange, vpdq/README.md; no code taken from it): the video
becomes the frames shown at a fixed interval (one a second: t = 0, 1, 2, ... s from the
first frame), each frame is PDQ-hashed, and each feature is (PDQ hex, quality, time in
seconds to 3 decimals). Matching treats the features as a bag: two videos match when
enough of their distinct frames of quality >= 50 lie within 31 bits of one another; the
times only say where a match lies. Unlike the PDQ of the 16 sampled frames, which
depends on the clip's length, these frames sit on a fixed clock, so a re-upload (re-
encoded, resized, trimmed at either end by whole seconds) hashes the same moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from synthwatch.operators.sample.common import (
    Deadline,
    Frame,
    SampleSettings,
    hms,
    read_head,
)
from synthwatch.operators.sniff import sniff
from synthwatch.schemas import HashAlgorithm, MediaHash

MATCH_DISTANCE = 31
"""PDQ: hashes within this many differing bits (of 256) are taken as the same image."""
MIN_QUALITY = 50
"""PDQ: hashes of lower quality carry too little structure to be matched on."""

VPDQ_SECONDS_PER_HASH = 1.0
"""vPDQ: one frame a second, the interval of Meta's reference description."""
VPDQ_MAX_HASHES = 900
"""vPDQ: at most this many frames per video: 15 minutes at one a second. A longer video
gets this many of its one-a-second frames, spread evenly over its whole length (`vpdq_times`),
not its first 15 minutes: matching is a bag of hashes, and an excerpt re-uploaded from
the middle of a long video, or a copy with another intro, must still find frames to
match, while a video's opening (title cards, channel bumpers) is the part most often
shared with unrelated videos. Each frame kept is still one the one-a-second clock
shows, so it is the very frame a full-rate vPDQ of the video holds at that time. Smart
seek decodes forward from the keyframe before each target, so the cost follows the
number of frames hashed more than the gaps between them: 20 hashes of a 60 s 1080p
clip with a keyframe a second took 1.81 s spread over it, 1.88 s from its first 20 s.
Where keyframes are further apart than the spread targets, each target decodes up to
half a GOP more. The record of what was left out is `vpdq_note`."""


def pdq(image: npt.NDArray[np.uint8]) -> tuple[str, int]:
    """(64 hex digits, quality) of an RGB uint8 image."""
    import pdqhash  # a compiled extension: loaded on the first item, not at import

    bits, quality = pdqhash.compute(np.ascontiguousarray(image))
    return _hex(bits), int(quality)


def _hex(bits: npt.ArrayLike) -> str:
    # ThreatExchange's own pdq_from_file joins the 256 bits in order into one binary
    # number and writes it as 64 lowercase hex digits: the first bit is the most
    # significant, which is what packbits does, eight bits to a byte.
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex()


def distance(a: str, b: str) -> int:
    """Hamming distance between two hex PDQ hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def frame_hashes(frames: Sequence[Frame], *, still: bool) -> list[MediaHash]:
    """PDQ of each sampled frame; a still's one hash carries no time."""
    return hash_frames(frames, still=still)[0]


DIHEDRAL = (
    "",
    "rotated a quarter turn",
    "turned upside down",
    "rotated a quarter turn",
    "flipped upside down",
    "mirrored",
    "rotated and flipped",
    "rotated and flipped",
)
"""How the picture of each of `pdqhash.compute_dihedral`'s eight hashes differs from the
image hashed: its order is the original, rotated 90, 180 and 270 degrees, flipped
vertically, flipped horizontally, and rotated 90 degrees then flipped each way. Which
quarter turn is not told apart: a copy rotated one way matches the other's hash."""


class Variant(msgspec.Struct, frozen=True):
    """The PDQ of a frame turned or flipped, for matching only (never stored):
    mirroring a re-upload is the cheapest way past a hash list, and PDQ, computed on
    the picture's 2-D cosine transform, gets all eight turns and flips of a frame for
    the price of one (ThreatExchange's "dihedral" hashes)."""

    hash: str
    quality: int
    time_s: float | None
    transform: str
    algorithm: HashAlgorithm = "pdq"
    """Whose turn it is: a sampled frame's (`pdq`) or a vPDQ frame's (`vpdq`)."""


class Vpdq(msgspec.Struct, frozen=True):
    """A video's vPDQ and, for matching only, each frame's seven turns and flips."""

    hashes: list[MediaHash]
    variants: list[Variant]


def hash_frames(frames: Sequence[Frame], *, still: bool) -> tuple[list[MediaHash], list[Variant]]:
    """(PDQ of each sampled frame, the seven turned and flipped PDQs of each)."""
    hashes: list[MediaHash] = []
    variants: list[Variant] = []
    for frame in frames:
        digests, quality = pdq_dihedral(frame.image)
        time_s = None if still else round(frame.time_s, 3)
        hashes.append(MediaHash(algorithm="pdq", hash=digests[0], quality=quality, time_s=time_s))
        variants.extend(
            Variant(digest, quality, time_s, how)
            for digest, how in zip(digests[1:], DIHEDRAL[1:], strict=True)
        )
    return hashes, variants


def pdq_dihedral(image: npt.NDArray[np.uint8]) -> tuple[list[str], int]:
    """(the eight hex PDQs of `image` in `DIHEDRAL` order, the first its plain PDQ;
    quality)."""
    import pdqhash

    vectors, quality = pdqhash.compute_dihedral(np.ascontiguousarray(image))
    return [_hex(v) for v in vectors], int(quality)


def vpdq_times(
    span_s: float,
    *,
    seconds_per_hash: float = VPDQ_SECONDS_PER_HASH,
    max_hashes: int = VPDQ_MAX_HASHES,
) -> list[float]:
    """vPDQ's target times, in seconds from the first frame, for a stream `span_s` long.

    Every `seconds_per_hash` from 0 while before the end (a clip of N whole seconds gets
    N); past `max_hashes` of them, `max_hashes` of those same times spread evenly from the
    start to the end (`VPDQ_MAX_HASHES` says why not the first ones).
    """
    _check_vpdq_args(seconds_per_hash, max_hashes)
    count = _grid_count(span_s, seconds_per_hash)
    if count <= max_hashes:
        steps: Iterable[int] = range(count)
    else:  # count > max_hashes: i * count // max_hashes is strictly increasing
        steps = (i * count // max_hashes for i in range(max_hashes))
    return [k * seconds_per_hash for k in steps]


def vpdq_note(
    span_s: float,
    *,
    seconds_per_hash: float = VPDQ_SECONDS_PER_HASH,
    max_hashes: int = VPDQ_MAX_HASHES,
) -> str | None:
    """For the verdict's notes: what the cap left out of the vPDQ of a video `span_s`
    long (`Sampled.sampled_s` or `duration_s`); None when it left out nothing."""
    _check_vpdq_args(seconds_per_hash, max_hashes)
    count = _grid_count(span_s, seconds_per_hash)
    if count <= max_hashes:
        return None
    return (
        f"vPDQ: {max_hashes} of the {count} frames at one every {seconds_per_hash:g} s "
        f"were hashed, spread evenly over all {hms(span_s)} (about one every "
        f"{span_s / max_hashes:.1f} s; cap max_hashes={max_hashes})"
    )


def vpdq_file(
    path: Path,
    settings: SampleSettings,
    *,
    seconds_per_hash: float = VPDQ_SECONDS_PER_HASH,
    max_hashes: int = VPDQ_MAX_HASHES,
) -> list[MediaHash]:
    """vPDQ of a video or animation (`vpdq_turned_file` without the turns)."""
    return vpdq_turned_file(
        path, settings, seconds_per_hash=seconds_per_hash, max_hashes=max_hashes, turns=False
    ).hashes


def vpdq_turned_file(
    path: Path,
    settings: SampleSettings,
    *,
    seconds_per_hash: float = VPDQ_SECONDS_PER_HASH,
    max_hashes: int = VPDQ_MAX_HASHES,
    turns: bool = True,
) -> Vpdq:
    """vPDQ of a video or animation: the PDQ of the frame shown at each `vpdq_times`
    time, one MediaHash (algorithm "vpdq") per distinct frame, in time order; `time_s` is
    the decoded frame's presentation time (as `frames_at` and the `pdq` records give it).
    A still or an audio-only file has no vPDQ: [].

    Decodes untrusted bytes in this process: run it through `sandbox.vpdq`. Each frame is
    hashed as it is decoded and dropped, so memory holds one frame whatever the length,
    and only the hashes leave the sandbox. Videos go through the sampler's smart seek
    (one packet index, then one pass forward through the targets, seeking only where a
    keyframe lies between two), animations through Pillow's frames at those times. The
    sampler's caps hold (`max_duration_s`, `max_image_frames`, `max_pixels`), and so does
    its deadline, `max_decode_s`, for the whole pass: past it this raises LimitExceeded
    rather than return a vPDQ of part of the video. Raises as `sample.sample` does.
    """
    from synthwatch.operators.sample import images, video

    _check_vpdq_args(seconds_per_hash, max_hashes)
    path = Path(path)
    deadline = Deadline.after(settings.max_decode_s)
    head = read_head(path)
    found = sniff(head)
    if found is not None and found[1] == "image":  # the sampler's own judgement
        with images.open_image(path, head, settings) as image:
            info = images.image_info(image, settings)
            if info.media_type != "video":  # a still
                return Vpdq(hashes=[], variants=[])
            with images.image_errors(settings):
                timeline = images.animation_timeline(image, settings, deadline)
                times = vpdq_times(
                    timeline.duration_s, seconds_per_hash=seconds_per_hash, max_hashes=max_hashes
                )
                frames = images.iter_animation_frames(image, timeline, times, settings, deadline)
                return _hash_frames(((f.time_s, f.image) for f in frames), deadline, turns)
    with video.open_av(path, settings) as container, video.av_errors():
        info = video.av_info(container, settings)
        if info.media_type != "video":  # audio only
            return Vpdq(hashes=[], variants=[])
        stream = video.video_stream(container)
        index = video.index_packets(container, stream, settings, deadline)
        start = index.seconds(index.pts[0])
        span = min(index.seconds(index.end - index.pts[0]), settings.max_duration_s)
        times = vpdq_times(span, seconds_per_hash=seconds_per_hash, max_hashes=max_hashes)
        # Frames shown at several targets (a slide held for seconds) are hashed once.
        picks = sorted({index.pts_at(index.to_pts(start + t)) for t in times})
        decoder = video.Decoder(container, stream, index, settings, deadline)
        decoder.wanted(picks)
        return _hash_frames((decoder.exact(pts) for pts in picks), deadline, turns)


def _hash_frames(
    frames: Iterable[tuple[float, npt.NDArray[np.uint8]]], deadline: Deadline, turns: bool
) -> Vpdq:
    """Hash each (time, image) as the generator decodes it, keeping only the hashes (and
    with `turns` the seven turned and flipped ones, at no extra cost): the image is
    freed when the next one is drawn."""
    out: list[MediaHash] = []
    variants: list[Variant] = []
    for time_s, image in frames:
        at = round(time_s, 3)
        if out and out[-1].time_s == at:  # a seek that landed on the same frame again
            continue
        digests, quality = pdq_dihedral(image)
        out.append(MediaHash(algorithm="vpdq", hash=digests[0], quality=quality, time_s=at))
        if turns:
            variants.extend(
                Variant(digest, quality, at, how, "vpdq")
                for digest, how in zip(digests[1:], DIHEDRAL[1:], strict=True)
            )
        deadline.check()  # hashing a 1080p frame takes about 30 ms of the budget too
    return Vpdq(hashes=out, variants=variants)


def _grid_count(span_s: float, seconds_per_hash: float) -> int:
    """Times 0, s, 2s, ... before `span_s` (at least the first frame's)."""
    if not math.isfinite(span_s) or span_s <= 0:
        return 1
    return max(1, math.ceil(span_s / seconds_per_hash - 1e-9))


def _check_vpdq_args(seconds_per_hash: float, max_hashes: int) -> None:
    if not (math.isfinite(seconds_per_hash) and seconds_per_hash > 0):
        raise ValueError(f"seconds_per_hash must be a positive number, not {seconds_per_hash}")
    if max_hashes < 1:
        raise ValueError(f"max_hashes must be at least 1, not {max_hashes}")
