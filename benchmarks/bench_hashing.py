"""What perceptual hashing adds to a scan: PDQ of the sampled frames, and the vPDQ pass.

usage: python -m benchmarks.bench_hashing [--quick] [--repeats N] [--long SECONDS]

Per item, with the default `SampleSettings` (16 frames, adaptive, audio on, in the
decoder sandbox), three costs, interleaved and rotated per repeat, medians reported:

- decode: `sandbox.sample`, what every scan pays to get its frames (the comparison);
- PDQ: `phash.frame_hashes` of those sampled frames, in this process, as the engine
  hashes them (no decoding: the frames are the decode's);
- vPDQ: `sandbox.vpdq`, a second pass over the file in the sandbox child that decodes
  the frame shown at each whole second and hashes it there (`VPDQ_MAX_HASHES` caps it).

The ratios are each one's wall time over the decode's: what hashing adds to decoding.
vPDQ grows with the video's length and the 16-frame sample does not, so it is also
given per second of video, from which the cost of a long video is projected. Wall time,
not CPU: the sandbox child's CPU is read from /proc in 10 ms ticks, too coarse for items
that decode in 20 ms (it is in the JSON rows, `* CPU s`); every pass is single-threaded,
so on an idle machine the two agree.

Media: the clips, animations and a few stills of ../shared/media/dev (skipped when
../shared is absent), and, unless `--long 0`, a generated camera-like 1080p H.264 clip
(GOP 30, `bench_clips`' content) long enough to show vPDQ's per-second cost where the
real clips, at most 34 s and mostly 512x512, do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, Report, Target, Timed, median_timed, tree_cpu_s
from synthwatch.operators import phash, sandbox
from synthwatch.operators.sample import Sampled, SampleSettings

SHARED = (ROOT / ".." / "shared" / "media").resolve()
VIDEOS = (
    "dev/real/facenet_multiface.mp4",
    "dev/real/liveportrait_s18.mp4",
    "dev/real/liveportrait_s13.mp4",
    "dev/real/liveportrait_d6.mp4",
    "dev/real/liveportrait_d9.mp4",
    "dev/real/liveportrait_d10.mp4",
    "dev/real/liveportrait_d3.mp4",
    "dev/real/sadtalker_ref_katiehill.mp4",
    "dev/real/ghost_dance.mp4",
    "dev/fake/liveportrait_generated_inference.gif",
    "dev/fake/sadtalker_generated_full.gif",
    "dev/fake/ghost_swap_elon.webp",
    "dev/images/real/declan_B1.jpg",
    "dev/images/fake/declan_A1.jpg",
    "dev/real/real00240.jpg",
)
QUICK = (
    "dev/real/facenet_multiface.mp4",
    "dev/real/liveportrait_d6.mp4",
    "dev/fake/sadtalker_generated_full.gif",
    "dev/images/real/declan_B1.jpg",
)
SETTINGS = SampleSettings()
"""The defaults a scan uses: vPDQ runs under the same caps and deadline."""
PROJECT_S = 600.0
"""The projected video length: ten minutes, 600 hashes at one a second."""


def _tree_timed(fn: Callable[[], Any]) -> Timed:
    """Wall time, and CPU of this process and its live sandbox children (from /proc:
    `timed`'s getrusage counts a child only once it is reaped, and these stay warm)."""
    pid = os.getpid()
    c0, t0 = tree_cpu_s(pid), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return Timed(wall, tree_cpu_s(pid) - c0)


def _median(runs: list[Timed]) -> Timed:
    return Timed(
        statistics.median(t.wall_s for t in runs), statistics.median(t.cpu_s for t in runs)
    )


def measure(name: str, path: Path, repeats: int) -> dict[str, Any]:
    sampled: Sampled = sandbox.sample(path, SETTINGS)  # warm-up, and the frames to hash
    still = sampled.media_type == "image" and len(sampled.frames) == 1
    hashes = sandbox.vpdq(path, SETTINGS)
    passes: dict[str, Callable[[], Any]] = {
        "decode": lambda: sandbox.sample(path, SETTINGS),
        "vpdq": lambda: sandbox.vpdq(path, SETTINGS),
    }
    runs: dict[str, list[Timed]] = {k: [] for k in passes}
    names = list(passes)
    for rep in range(repeats):
        shift = rep % len(names)
        for key in names[shift:] + names[:shift]:
            runs[key].append(_tree_timed(passes[key]))
    _, pdq = median_timed(lambda: phash.frame_hashes(sampled.frames, still=still), repeats)
    decode, vpdq = _median(runs["decode"]), _median(runs["vpdq"])
    duration = sampled.duration_s if not still else None
    height, width = sampled.frames[0].image.shape[:2] if sampled.frames else (0, 0)
    per_s = vpdq.wall_s / duration * 1000 if duration else None
    return {
        "item": name,
        "kind": "still" if still else f"{sampled.container.split(',')[0]} {width}x{height}",
        "dur s": duration,
        "frames": len(sampled.frames),
        "vpdq hashes": len(hashes),
        "decode ms": decode.wall_s * 1000,
        "PDQ ms": pdq.wall_s * 1000,
        "vPDQ ms": vpdq.wall_s * 1000,
        "PDQ / decode": pdq.wall_s / decode.wall_s,
        "vPDQ / decode": vpdq.wall_s / decode.wall_s,
        "vPDQ ms per video s": per_s,
        "vPDQ ms per hash": vpdq.wall_s / len(hashes) * 1000 if hashes else None,
        "decode CPU s": decode.cpu_s,
        "PDQ CPU s": pdq.cpu_s,
        "vPDQ CPU s": vpdq.cpu_s,
        "vPDQ capped": phash.vpdq_note(duration) is not None if duration else False,
    }


def _per_s(row: dict[str, Any]) -> float:
    return float(row["vPDQ ms per video s"] or 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="4 shared items, 3 repeats, a 20 s long clip"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--long", type=float, default=None, help="seconds of the generated 1080p clip (0: none)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    long_s = (20.0 if args.quick else 60.0) if args.long is None else args.long

    items: dict[str, Path] = {}
    if SHARED.is_dir():
        for rel in QUICK if args.quick else VIDEOS:
            if (SHARED / rel).is_file():
                items[Path(rel).name] = SHARED / rel
    if long_s > 0:
        from benchmarks.bench_clips import Clip, make_clip

        print(f"generating a {long_s:g} s 1080p clip (cached) ...", flush=True)
        clip = make_clip(Clip(0, width=1920, height=1080, seconds=long_s))
        items[f"generated 1080p {long_s:g} s"] = clip

    report = Report(
        name="hashing",
        title=f"Hashing cost against the default sampling decode (wall, medians of {repeats})",
        columns=[
            "item",
            "kind",
            "dur s",
            "frames",
            "vpdq hashes",
            "decode ms",
            "PDQ ms",
            "vPDQ ms",
            "PDQ / decode",
            "vPDQ / decode",
            "vPDQ ms per video s",
        ],
        params={
            "quick": args.quick,
            "repeats": repeats,
            "settings": SETTINGS.model_dump(),
            "vpdq_seconds_per_hash": phash.VPDQ_SECONDS_PER_HASH,
            "vpdq_max_hashes": phash.VPDQ_MAX_HASHES,
            "shared": str(SHARED) if SHARED.is_dir() else None,
            "long_s": long_s,
        },
    )
    if not SHARED.is_dir():
        report.notes.append(f"{SHARED} not found: the shared media were skipped")
    if not items:
        print("no media to measure (../shared absent and --long 0)")
        return 0
    sandbox.prestart(SETTINGS.max_memory_mb)
    load = [os.getloadavg()[0]]
    for name, path in items.items():
        print(f"measuring {name} ...", flush=True)
        report.rows.append(measure(name, path, repeats))
    load.append(os.getloadavg()[0])
    report.params["load_1min"] = load
    if load[0] > 1.0 or load[1] > 2.0:  # this run itself keeps about one core busy
        # Others' work slows each pass alike, so the ratios hold; absolute times and the
        # projections from them do not.
        report.notes.append(
            f"the machine was busy (1-min load {load[0]:.1f} at the start, {load[1]:.1f} at "
            f"the end, on {len(os.sched_getaffinity(0))} cores): absolute times and the "
            "projections are inflated, the ratios much less"
        )

    videos = [r for r in report.rows if r["dur s"]]
    if videos:
        decode = sum(r["decode ms"] for r in videos)
        report.notes.append(
            f"all {len(videos)} videos and animations together: PDQ of the sampled frames "
            f"{sum(r['PDQ ms'] for r in videos) / decode:.3f}x the decode, vPDQ "
            f"{sum(r['vPDQ ms'] for r in videos) / decode:.2f}x, over "
            f"{sum(r['dur s'] for r in videos):.0f} s of video"
        )
    # Ten minutes at one hash a second, from each clip's cost per second of video: from
    # the long generated clip (fixed costs amortised), and from the real clip that costs
    # most per second (camera bitrate, but a few seconds long: its fixed costs inflate it).
    long_rows = [r for r in videos if r["item"].startswith("generated")]
    worst = max((r for r in videos if r not in long_rows), key=_per_s, default=None)
    for row in [*long_rows, *([worst] if worst else [])]:
        report.targets.append(
            Target(
                f"vPDQ of {PROJECT_S:g} s like {row['item']} ({row['kind']}), projected "
                f"wall s, within max_decode_s",
                _per_s(row) * PROJECT_S / 1000,
                SETTINGS.max_decode_s,
                at_least=False,
            )
        )
    report.notes.append(
        "decode: sandbox.sample, 16 frames adaptive with audio; PDQ: phash.frame_hashes of "
        "those frames in-process; vPDQ: sandbox.vpdq, its own decode of the frame at each "
        "whole second, hashed in the child; ratios are over the decode's wall time"
    )
    report.notes.append(
        "a projection over max_decode_s means the vPDQ of such a video fails LimitExceeded "
        "under the scan's default deadline: where keyframes are a second or more apart, vPDQ "
        "decodes every reference frame of the video (and each frame it hashes), and hashes "
        "each at full resolution"
    )
    report.notes.append(
        "stills have no vPDQ (it returns [] after reading the header): their vPDQ column "
        "is the sandbox round trip"
    )
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
