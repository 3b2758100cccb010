"""vPDQ: the PDQ of the frame shown at each whole second, hashed inside the decoder sandbox."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from synthwatch.errors import CorruptMedia, LimitExceeded, SynthwatchError
from synthwatch.operators import phash, sandbox
from synthwatch.operators.sample import SampleSettings, frames_at, sample
from synthwatch.schemas import MediaHash

# tests/ has no conftest of its own to put media_factory on the path.
from tests import media_factory as mf

SECONDS = 6
FPS = 25
IN_PROCESS = SampleSettings(isolate=False)
ISOLATED = SampleSettings()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vpdq")


def _texture(height: int, width: int, seed: int = 3) -> np.ndarray:
    """Octaves of upsampled noise: detail at every scale, as in a camera scene. PDQ needs
    it: a flat colour hashes at quality 0, a smooth blur under 50, and media_factory's
    gradients, though of quality 100, move by 40 bits when halved in size."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), dtype=np.float32)
    for octave in range(6):
        cells = 8 * 2**octave
        small = rng.integers(0, 256, size=(max(2, height * cells // width), cells, 3))
        layer = Image.fromarray(small.astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        out += np.asarray(layer, dtype=np.float32) * 0.8**octave
    out -= out.min()
    out *= 255.0 / max(float(out.max()), 1e-6)
    return out.astype(np.uint8)


@pytest.fixture(scope="module")
def clip(media: Path) -> Path:
    """A 6 s clip panning over a texture, 4 px a frame, with x264's B-frames."""
    width, height, speed, n = 320, 240, 4, SECONDS * FPS
    texture = _texture(height, width + speed * n)
    path = media / "pan.mp4"
    with av.open(str(path), mode="w") as out:
        options = {"preset": "veryfast", "crf": "20", "sc_threshold": "0"}
        stream = out.add_stream("libx264", rate=FPS, options=options)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 50
        for i in range(n):
            image = np.ascontiguousarray(texture[:, speed * i : speed * i + width])
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def gif(media: Path) -> Path:
    """A 4 s animated GIF (16 frames of 250 ms) of a texture panning sideways."""
    texture = _texture(72, 96 + 8 * 16, seed=5)
    frames = [Image.fromarray(texture[:, 8 * i : 8 * i + 96]) for i in range(16)]
    path = media / "pan.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return path


def _reencode(src: Path, dst: Path, *, scale: float, crf: int) -> Path:
    """The clip as a re-upload: decoded, scaled, encoded again at a lower quality."""
    with av.open(str(src)) as inp, av.open(str(dst), mode="w") as out:
        source = inp.streams.video[0]
        width = round(source.codec_context.width * scale) // 2 * 2
        height = round(source.codec_context.height * scale) // 2 * 2
        options = {"preset": "ultrafast", "crf": str(crf)}
        stream = out.add_stream("libx264", rate=FPS, options=options)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, frame in enumerate(inp.decode(source)):
            scaled = frame.reformat(width=width, height=height, format="yuv420p")
            scaled.pts, scaled.time_base = i, Fraction(1, FPS)
            out.mux(stream.encode(scaled))
        out.mux(stream.encode(None))
    return dst


def _matched_share(query: list[MediaHash], reference: list[MediaHash]) -> float:
    """Share of the reference's distinct frames of matchable quality that some frame of
    the query lies within the match distance of (vPDQ's comparison, one direction)."""
    wanted = {h.hash for h in reference if h.quality >= phash.MIN_QUALITY}
    found = [h.hash for h in query if h.quality >= phash.MIN_QUALITY]
    matched = sum(any(phash.distance(w, f) <= phash.MATCH_DISTANCE for f in found) for w in wanted)
    return matched / len(wanted)


def test_a_clip_gets_one_hash_a_second_at_the_times_of_the_frames_shown(clip: Path) -> None:
    hashes = phash.vpdq_file(clip, IN_PROCESS)
    assert len(hashes) == SECONDS
    assert all(h.algorithm == "vpdq" and h.quality >= phash.MIN_QUALITY for h in hashes)
    times = [h.time_s for h in hashes if h.time_s is not None]
    assert times == pytest.approx([float(k) for k in range(SECONDS)], abs=1 / FPS)
    assert all(b - a == pytest.approx(1.0, abs=1 / FPS) for a, b in itertools.pairwise(times))
    for h in hashes:
        assert h.time_s is not None and h.time_s == round(h.time_s, 3)
        [frame] = frames_at(clip, [h.time_s], IN_PROCESS)
        assert round(frame.time_s, 3) == h.time_s
        assert (h.hash, h.quality) == phash.pdq(frame.image)  # the very frame, to the bit
    assert len({h.hash for h in hashes}) == SECONDS  # the content moves


def test_a_re_encoded_half_size_copy_matches_on_its_distinct_frames(
    clip: Path, media: Path
) -> None:
    original = phash.vpdq_file(clip, IN_PROCESS)
    copy = phash.vpdq_file(_reencode(clip, media / "copy.mp4", scale=0.5, crf=34), IN_PROCESS)
    assert len(copy) == len(original)
    assert _matched_share(copy, original) >= 0.8
    assert _matched_share(original, copy) >= 0.8


def test_an_animation_is_hashed_at_the_frames_it_shows_each_second(gif: Path) -> None:
    assert sample(gif, IN_PROCESS).media_type == "video"  # how the sampler classes it
    hashes = phash.vpdq_file(gif, IN_PROCESS)
    assert [h.time_s for h in hashes] == [0.0, 1.0, 2.0, 3.0]
    assert all(h.quality >= phash.MIN_QUALITY for h in hashes)
    for h in hashes:
        assert h.time_s is not None
        [frame] = frames_at(gif, [h.time_s], IN_PROCESS)
        assert (h.hash, h.quality) == phash.pdq(frame.image)


def test_stills_and_audio_have_no_vpdq(media: Path) -> None:
    for path in (
        mf.make_image(media / "still.jpg", width=200, height=150),
        mf.make_image(media / "still.png", width=200, height=150, fmt="PNG"),
        mf.make_animated(media / "one.gif", frames=1),  # one frame: a still
        mf.make_audio(media / "tone.wav", seconds=1.0),
    ):
        assert phash.vpdq_file(path, IN_PROCESS) == [], path.name
        assert sandbox.vpdq(path, ISOLATED) == [], path.name


def test_the_sandbox_returns_what_the_in_process_pass_does(clip: Path, gif: Path) -> None:
    for path in (clip, gif):
        isolated = sandbox.vpdq(path, ISOLATED)
        assert isolated and isolated == phash.vpdq_file(path, IN_PROCESS)
        assert all(type(h) is MediaHash for h in isolated)
    capped = sandbox.vpdq(clip, ISOLATED, seconds_per_hash=0.5, max_hashes=4)
    assert capped == phash.vpdq_file(clip, IN_PROCESS, seconds_per_hash=0.5, max_hashes=4)


def test_a_corrupt_file_raises_what_the_sampler_raises(clip: Path, media: Path) -> None:
    cut = mf.make_corrupt(media / "cut.mp4", clip)
    junk = media / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    for path in (cut, junk):
        with pytest.raises(SynthwatchError) as sampled:
            sample(path, IN_PROCESS)
        for hashing, settings in ((phash.vpdq_file, IN_PROCESS), (sandbox.vpdq, ISOLATED)):
            with pytest.raises(SynthwatchError) as hashed:
                hashing(path, settings)
            assert type(hashed.value) is type(sampled.value) is CorruptMedia


def test_max_hashes_spreads_the_cap_over_the_whole_clip_and_says_so(clip: Path) -> None:
    full = phash.vpdq_file(clip, IN_PROCESS)
    capped = phash.vpdq_file(clip, IN_PROCESS, max_hashes=3)
    # Every second one of the same one-a-second frames, from the start to the end.
    assert capped == full[::2]
    assert phash.vpdq_note(SECONDS, max_hashes=3) == (
        "vPDQ: 3 of the 6 frames at one every 1 s were hashed, spread evenly over all "
        "6.0 s (about one every 2.0 s; cap max_hashes=3)"
    )
    assert phash.vpdq_note(SECONDS) is None
    # Long videos: 900 whole seconds spread over two hours, never more.
    times = phash.vpdq_times(7200.0)
    assert len(times) == phash.VPDQ_MAX_HASHES and times[:3] == [0.0, 8.0, 16.0]
    assert times[-1] == 7192.0 and all(t == int(t) for t in times)
    assert len(phash.vpdq_times(1000.0)) == 900 and phash.vpdq_times(2.5) == [0.0, 1.0, 2.0]


def test_another_interval_and_bad_arguments(clip: Path) -> None:
    half = phash.vpdq_file(clip, IN_PROCESS, seconds_per_hash=0.5)
    # The frame shown at 0.5 s is the one that starts at 0.48 s.
    assert [h.time_s for h in half] == pytest.approx(
        [k / 2 for k in range(2 * SECONDS)], abs=1 / FPS
    )
    with pytest.raises(ValueError):
        phash.vpdq_file(clip, IN_PROCESS, seconds_per_hash=0)
    with pytest.raises(ValueError):
        phash.vpdq_file(clip, IN_PROCESS, max_hashes=0)


@pytest.mark.parametrize("isolate", [False, True])
def test_the_decode_deadline_holds(clip: Path, gif: Path, isolate: bool) -> None:
    hashing: Callable[[Path, SampleSettings], list[MediaHash]] = (
        sandbox.vpdq if isolate else phash.vpdq_file
    )
    for path in (clip, gif):
        with pytest.raises(LimitExceeded, match="SYNTHWATCH_SAMPLE__MAX_DECODE_S"):
            hashing(path, SampleSettings(max_decode_s=1e-9, isolate=isolate))


def test_the_turned_vpdq_has_seven_turns_of_each_frame_in_and_out_of_the_sandbox(
    clip: Path,
) -> None:
    isolated = sandbox.vpdq_turned(clip, ISOLATED)
    plain = phash.vpdq_file(clip, IN_PROCESS)
    assert isolated.hashes == plain
    assert len(isolated.variants) == 7 * len(plain)
    assert {v.algorithm for v in isolated.variants} == {"vpdq"}
    assert [v.transform for v in isolated.variants[:7]] == list(phash.DIHEDRAL[1:])
    assert phash.vpdq_turned_file(clip, IN_PROCESS) == isolated
