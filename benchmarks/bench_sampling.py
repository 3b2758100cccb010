"""Frame sampling: full decode, exact (smart seek), keyframes only and adaptive, 16 frames.

Usage: `python -m benchmarks.bench_sampling [--quick] [--threads] [--repeats N]`.

The clips are generated here (PyAV encoders, cached under benchmarks/.cache/): a panning
fractal texture with two drifting real faces and per-frame grain, so the encoder
spends its bits as on camera video, at a fixed GOP. Encoders use `thread_type="FRAME"`:
PyAV's default slice threading writes several slices per frame, which flatters the
decoder (shared/PERF_NOTES.md).

For each clip the strategies run interleaved in one process, the order rotated per
repeat, and medians are reported. Cost is CPU time (all threads, `getrusage`) per
distinct frame returned; each strategy's cost is given as how many times cheaper it is
than full decode's. The timestamp error of a strategy is, over the targets, the largest
distance from a target to the nearest frame it returned. The operator is called in this
process: the decoder sandbox's fixed per-item overhead is not part of what is compared.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from PIL import Image

from benchmarks._common import ROOT, Report, Target, Timed, timed
from synthwatch.operators import sample as sample_op
from synthwatch.operators.sample import Deadline, SampleSettings
from synthwatch.operators.sample import video as sample_video

CACHE = ROOT / "benchmarks" / ".cache"
FRAMES = 16
FPS = 30
CLIP_VERSION = 2
"""Bump when the generated content or encoder settings change, so the cache is rebuilt."""

_CONTAINER = {"libx264": ".mp4", "libx265": ".mp4", "libvpx-vp9": ".webm"}
_LABEL = {"libx264": "H.264", "libx265": "HEVC", "libvpx-vp9": "VP9"}


def _encoder_options(codec: str, gop: int) -> dict[str, str]:
    # Scene-cut detection off so the GOP is exactly `gop`; x264 "veryfast" keeps B-frames
    # and CABAC (ultrafast drops both, which makes decoding unrealistically cheap); x265
    # keeps its default open GOP, whose seek quirk the sampler must handle.
    if codec == "libx264":
        return {"preset": "veryfast", "crf": "23", "sc_threshold": "0"}
    if codec == "libx265":
        params = f"log-level=error:scenecut=0:keyint={gop}:min-keyint={gop}:open-gop=1"
        return {"preset": "superfast", "crf": "26", "x265-params": params}
    return {
        "deadline": "realtime",
        "cpu-used": "8",
        "crf": "32",
        "b": "0",
        "keyint_min": str(gop),
        "row-mt": "1",
    }


@dataclass(frozen=True)
class Clip:
    codec: str
    height: int
    gop: int
    seconds: float

    @property
    def width(self) -> int:
        return self.height * 16 // 9

    @property
    def name(self) -> str:
        return f"{_LABEL[self.codec]} {self.height}p g{self.gop}"

    @property
    def n_frames(self) -> int:
        return round(self.seconds * FPS)

    @property
    def path(self) -> Path:
        return self.path_in(CACHE)

    def path_in(self, directory: Path) -> Path:
        stem = f"{self.codec}-{self.height}p-gop{self.gop}-{self.seconds:g}s-v{CLIP_VERSION}"
        return directory / (stem + _CONTAINER[self.codec])


def clips(quick: bool) -> list[Clip]:
    if quick:
        # The reference clip (20 s 1080p H.264, a keyframe every 30 frames)
        # keeps its full length: at 10 s it has 10 keyframes for 16 targets.
        return [
            Clip("libx264", 1080, 30, 20.0),
            Clip("libx264", 1080, 250, 10.0),
            Clip("libvpx-vp9", 720, 120, 10.0),
        ]
    return [
        Clip(codec, height, gop, 20.0)
        for codec in ("libx264", "libx265", "libvpx-vp9")
        for height in (1080, 720)
        for gop in (30, 250)
    ]


def encoder_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # not built into this FFmpeg
        return False
    return True


# --------------------------------------------------------------------------- clip generation


def fractal(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Octaves of upsampled noise, one per channel: texture at every scale, like a scene."""
    out = np.zeros((height, width, 3), dtype=np.float32)
    for octave in range(7):
        cells = 4 * 2**octave
        small = rng.random((max(2, height * cells // width), cells, 3), dtype=np.float32)
        layers = [
            np.asarray(
                Image.fromarray(small[..., c]).resize((width, height), Image.Resampling.BICUBIC)
            )
            for c in range(3)
        ]
        out += np.stack(layers, axis=-1) * (0.6**octave)
    out -= out.min()
    out *= 255.0 / max(float(out.max()), 1e-6)
    return out.astype(np.uint8)


def face_patch(height: int) -> tuple[np.ndarray, np.ndarray]:
    """A real face to paste into generated media, `height` pixels tall, and its mask
    (the whole patch): the head and shoulders of scikit-image's `astronaut` (Eileen
    Collins, a NASA portrait in the public domain). The face detector finds it once the
    patch is a third of the frame's height, so the face models run on the generated
    media as they do on camera footage; a drawn face-like sprite was never detected, and
    the benchmarks then measured no face inference at all."""
    import skimage.data

    head = skimage.data.astronaut()[10:250, 110:340]
    width = height * head.shape[1] // head.shape[0]
    patch = np.asarray(Image.fromarray(head).resize((width, height), Image.Resampling.BILINEAR))
    return patch, np.ones(patch.shape[:2], dtype=bool)


def make_clip(clip: Clip, directory: Path = CACHE) -> Path:
    """Encode `clip` into `directory` unless it holds it already."""
    path = clip.path_in(directory)
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(clip.height * 1000 + clip.gop)
    w, h, n = clip.width, clip.height, clip.n_frames
    speed = 3  # pixels per frame of camera pan
    texture = fractal(h + n // 2 + 1, w + speed * n + 1, rng)
    face, mask = face_patch(h // 3)
    tmp = path.with_name(f".{os.getpid()}-{path.name}")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(
            clip.codec, rate=FPS, options=_encoder_options(clip.codec, clip.gop)
        )
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = clip.gop
        stream.codec_context.thread_type = "FRAME"
        for i in range(n):
            image = texture[i // 2 : i // 2 + h, speed * i : speed * i + w].astype(np.int16)
            for k, phase in enumerate((0.0, 0.45)):
                x = int((w - mask.shape[1]) * (0.5 + 0.45 * np.sin(i / 40 + phase * 7)))
                y = int((h - mask.shape[0]) * (0.05 + 0.9 * k))
                region = image[y : y + mask.shape[0], x : x + mask.shape[1]]
                region[mask] = face[mask]
            image += rng.integers(-12, 13, size=(h, w, 1), dtype=np.int16)  # grain
            frame = VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), "rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------- strategies

Picked = list[tuple[float, np.ndarray]]
"""(presentation time, RGB image) of each distinct frame a strategy returned."""


def full_decode(path: Path, targets: list[float], thread_type: str = "SLICE") -> Picked:
    """Decode every frame; keep the one shown at each target (the reference strategy)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = thread_type
        stream.codec_context.thread_count = 2 if thread_type == "FRAME" else 1
        shown: list[VideoFrame | None] = [None] * len(targets)
        for frame in container.decode(stream):
            t = float(frame.time or 0.0)
            for i, target in enumerate(targets):
                if t <= target + 1e-9:
                    shown[i] = frame
        reformatter = VideoReformatter()
        out: dict[float, np.ndarray] = {}
        for pick in shown:
            if pick is not None and float(pick.time or 0.0) not in out:
                rgb = reformatter.reformat(pick, format="rgb24", threads=1)
                out[float(pick.time or 0.0)] = rgb.to_ndarray()
        return sorted(out.items(), key=lambda item: item[0])


def synthwatch(path: Path, mode: str) -> Picked:
    settings = SampleSettings(frames=FRAMES, mode=mode, audio=False)  # type: ignore[arg-type]
    return [(f.time_s, f.image) for f in sample_op.sample(path, settings).frames]


def keyframes_only(path: Path, targets: list[float]) -> Picked:
    """The nearest keyframe to each target, nothing else: synthwatch's own index and
    decoder (`sample.video`), without the exact top-up its keyframes mode adds."""
    settings = SampleSettings(frames=FRAMES, audio=False)
    deadline = Deadline.after(settings.max_decode_s)
    with sample_video.open_av(path, settings) as container:
        stream = sample_video.video_stream(container)
        index = sample_video.index_packets(container, stream, settings, deadline)
        decoder = sample_video.Decoder(container, stream, index, settings, deadline)
        keys = sorted({index.nearest_keyframe(index.to_pts(t)) for t in targets})
        decoded = (decoder.keyframe(k) for k in keys)
        return [d for d in decoded if d is not None]


# --------------------------------------------------------------------------- measurement


def max_error(picked: Picked, targets: list[float]) -> float:
    if not picked:
        return float("inf")
    return max(min(abs(t - target) for t, _ in picked) for target in targets)


def measure(clip: Clip, repeats: int, threads: bool) -> list[dict[str, Any]]:
    path = make_clip(clip)
    duration = clip.n_frames / FPS
    targets = [duration * (i + 0.5) / FRAMES for i in range(FRAMES)]
    strategies: dict[str, Callable[[], Picked]] = {
        "full": lambda: full_decode(path, targets),
        "exact": lambda: synthwatch(path, "exact"),
        "keyframes": lambda: keyframes_only(path, targets),
        "adaptive": lambda: synthwatch(path, "adaptive"),
    }
    if threads:
        strategies["full FRAMEx2"] = lambda: full_decode(path, targets, "FRAME")
    names = list(strategies)
    results: dict[str, Picked] = {name: strategies[name]() for name in names}  # warm-up
    runs: dict[str, list[Timed]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            results[name], t = timed(strategies[name])
            runs[name].append(t)
    rows: list[dict[str, Any]] = []
    base: float | None = None
    for name in names:
        wall = statistics.median(t.wall_s for t in runs[name])
        cpu = statistics.median(t.cpu_s for t in runs[name])
        got = len(results[name])
        per_frame = cpu / max(got, 1)
        if base is None:
            base = per_frame
        rows.append(
            {
                "clip": clip.name,
                "strategy": name,
                "frames": got,
                "asked": FRAMES,
                "max err s": max_error(results[name], targets),
                "wall s": wall,
                "CPU s": cpu,
                "frames/CPU s": got / cpu if cpu > 0 else None,
                "x vs full": base / per_frame if per_frame > 0 else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 clips, 2 repeats")
    parser.add_argument("--threads", action="store_true", help="add full decode, FRAME x2")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="override clip length")
    parser.add_argument("--clip", default="", help="only clips whose name contains this")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)

    chosen = [
        replace(c, seconds=args.seconds or c.seconds)
        for c in clips(args.quick)
        if encoder_available(c.codec) and args.clip in c.name
    ]
    missing = sorted({c.codec for c in clips(args.quick) if not encoder_available(c.codec)})
    report = Report(
        name="sampling",
        title=f"Sampling {FRAMES} frames per clip (medians of {repeats}, interleaved)",
        columns=[
            "clip",
            "strategy",
            "frames",
            "max err s",
            "wall s",
            "CPU s",
            "frames/CPU s",
            "x vs full",
        ],
        params={
            "quick": args.quick,
            "repeats": repeats,
            "frames": FRAMES,
            "fps": FPS,
            "clips": [
                {"name": c.name, "codec": c.codec, "seconds": c.seconds, "gop": c.gop}
                for c in chosen
            ],
            "encoder_options": {c: _encoder_options(c, 0) for c in sorted(_CONTAINER)},
        },
    )
    for clip in chosen:
        print(f"measuring {clip.name} ({clip.seconds:g} s) ...", flush=True)
        report.rows.extend(measure(clip, repeats, args.threads))

    def row(clip: str, strategy: str) -> dict[str, Any]:
        return next(r for r in report.rows if r["clip"] == clip and r["strategy"] == strategy)

    short = [c for c in chosen if (c.codec, c.height, c.gop) == ("libx264", 1080, 30)]
    if short:
        keyframes = math.ceil(short[0].n_frames / short[0].gop)
        if keyframes < FRAMES:
            report.notes.append(
                f"{short[0].name} ({short[0].seconds:g} s) has {keyframes} keyframes for "
                f"{FRAMES} targets: adaptive decodes the rest exactly, so the 8x target "
                "needs as many keyframes as targets (the full run's 20 s clips)"
            )
        report.targets.append(
            Target(
                "adaptive vs full decode, CPU per sampled frame, 1080p H.264 GOP 30 (x)",
                float(row(short[0].name, "adaptive")["x vs full"]),
                8.0,
            )
        )
    adaptive = [r for r in report.rows if r["strategy"] == "adaptive"]
    if adaptive:
        report.targets.append(
            Target(
                "adaptive frames returned / asked, minimum over clips",
                min(r["frames"] / r["asked"] for r in adaptive),
                1.0,
            )
        )
        worst = max(r["CPU s"] / row(r["clip"], "exact")["CPU s"] for r in adaptive)
        report.notes.append(
            f"adaptive costs at most {worst:.2f}x exact smart seek's CPU on any clip"
        )
    if missing:
        report.notes.append(f"encoders not in this PyAV build, clips skipped: {missing}")
    report.notes.append(
        "full: decode every frame, keep the one shown at each target; exact: synthwatch "
        "mode=exact (smart seek); keyframes: the keyframe nearest each target, nothing "
        "else; adaptive: synthwatch mode=adaptive"
        + ("; full FRAMEx2: full with 2 frame threads" if args.threads else "")
    )
    report.notes.append(
        "max err s: largest distance from a target time to the nearest returned frame; "
        f"exact frames are within one frame ({1 / FPS:.3f} s), adaptive's within half the "
        "target spacing"
    )
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
