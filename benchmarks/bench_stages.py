"""Where one item's scan time goes: each stage of `Engine.analyze`, per kind of clip.

usage: python -m benchmarks.bench_stages [--quick]

Issue 18 asks for the scan's cost stage by stage on face-less and face-bearing 720p and
1080p clips, so the largest stage is cut first. One engine (the settings `make scan`
uses: SYNTHWATCH_MODEL_DIR, else ../shared/weights) scans each clip `repeats` times
in this process, with its stages wrapped in timers:

- sandbox start: a fresh decoder child, spawn to first answer (`sandbox.probe` with
  the pool emptied), against a warm child's answer;
- decode: `sandbox.sample` (the sampled frames, in the warm child);
- face detection: the face finder on the sampled frames (MTCNN, else the LBP cascade);
- face models: the rest of the face step (crops, tracking, the face detectors);
- whole-image models: patches of every frame through the image models;
- forensics, provenance, audio: their steps;
- fusion: the rest of `analyze` (calibration, fusion, decision, the verdict);
- evidence: what a flagged item adds, the driving frames re-decoded and explained
  (`sampled_evidence`: occlusion heatmaps), timed for every item whatever its decision.

Media: the face-less 720p clips of `bench_clips` (the first one) and a 1080p one made
the same way (8 s), and the face-bearing clips of ../shared/media/dev/real (1280x720
`liveportrait_s18.mp4`, 1920x1080 `facenet_multiface.mp4`) when ../shared is there.
Times are the median over the repeats, in ms per item; the table's last row is the sum.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, Report, console
from benchmarks.bench_clips import Clip, make_clip, scan_env

SHARED_CLIPS = {
    "faces 720p": "media/dev/real/liveportrait_s18.mp4",
    "faces 1080p": "media/dev/real/facenet_multiface.mp4",
}
STAGES = (
    "decode",
    "face detection",
    "face models",
    "whole-image models",
    "forensics",
    "provenance",
    "audio",
    "fusion",
    "evidence",
)


def media() -> dict[str, Path]:
    out = {
        "no faces 720p": make_clip(Clip(0)),
        "no faces 1080p": make_clip(Clip(0, width=1920, height=1080, seconds=8.0)),
    }
    shared = (ROOT / ".." / "shared").resolve()
    for name, rel in SHARED_CLIPS.items():
        if (shared / rel).is_file():
            out[name] = shared / rel
    return out


def _media_type(path: Path) -> Any:
    from synthwatch.operators.sniff import sniff

    with path.open("rb") as fh:
        found = sniff(fh.read(4096))
    if found is None:
        raise SystemExit(f"{path}: not a media file")
    return found[1]


def _wrap(times: dict[str, float], stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[stage] += time.perf_counter() - t0

    return timed


def sandbox_start(path: Path, settings: Any) -> tuple[float, float]:
    """(cold, warm) seconds for a probe answered by a fresh child and by a warm one."""
    from synthwatch.operators import sandbox

    sandbox._pool().close()
    t0 = time.perf_counter()
    sandbox.probe(path, settings)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    sandbox.probe(path, settings)
    return cold, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="median of 2 scans per clip (else 3)")
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else 3

    env, model_dir = scan_env()
    os.environ.update(env)
    from synthwatch.digest import file_sha256
    from synthwatch.pipeline.engine import Engine, Item, sampled_evidence
    from synthwatch.pipeline.settings import Settings

    clips = media()
    settings = Settings()
    per_clip: dict[str, dict[str, float]] = {}
    extra: dict[str, dict[str, Any]] = {}
    with Engine(settings) as engine:
        for name, path in clips.items():
            cold, warm = sandbox_start(path, settings.sample)
            runs: list[dict[str, float]] = []
            for _ in range(repeats + 1):  # the first run warms caches; not counted
                times: dict[str, float] = defaultdict(float)
                originals = {
                    m: getattr(engine, m)
                    for m in ("_sample", "_faces", "_images", "_forensics", "_provenance", "_audio")
                }
                stage_of = {
                    "_sample": "decode",
                    "_faces": "faces",
                    "_images": "whole-image models",
                    "_forensics": "forensics",
                    "_provenance": "provenance",
                    "_audio": "audio",
                }
                for m, fn in originals.items():
                    setattr(engine, m, _wrap(times, stage_of[m], fn))
                finder = engine.faces
                detect = finder.detect if finder is not None else None
                if finder is not None and detect is not None:
                    finder.detect = _wrap(times, "face detection", detect)  # type: ignore[method-assign]
                try:
                    sha = file_sha256(path)
                    item = Item(
                        id=sha[:32],
                        url=str(path),
                        source=name,
                        submitted_at=time.time(),
                        sha256=sha,
                        media_type=_media_type(path),
                        path=path,
                        blob=str(path),
                    )
                    t0 = time.perf_counter()
                    analysis = engine.analyze(item)
                    total = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    sampled_evidence(engine, analysis, path)
                    times["evidence"] = time.perf_counter() - t0
                finally:
                    for m in originals:
                        delattr(engine, m)
                    if finder is not None and detect is not None:
                        del finder.detect
                steps = sum(v for k, v in times.items() if k not in ("evidence", "face detection"))
                times["face models"] = times.pop("faces", 0.0) - times["face detection"]
                times["fusion"] = total - steps
                runs.append(dict(times))
                verdict = analysis.verdict
            per_clip[name] = {
                s: statistics.median(r.get(s, 0.0) for r in runs[1:]) * 1000 for s in STAGES
            }
            per_clip[name]["sandbox start"] = cold * 1000
            extra[name] = {
                "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                "frames": len(analysis.sampled.frames),
                "faces_found": verdict.faces_found,
                "decision": verdict.decision,
                "warm_child_probe_ms": round(warm * 1000, 1),
            }
            console.print(f"{name}: {extra[name]}")

    columns = ["stage (ms per item)", *per_clip]
    rows = []
    for stage in ("sandbox start", *STAGES):
        rows.append({"stage (ms per item)": stage, **{c: per_clip[c][stage] for c in per_clip}})
    rows.append(
        {
            "stage (ms per item)": "total (sandbox start excluded)",
            **{c: sum(per_clip[c][s] for s in STAGES) for c in per_clip},
        }
    )
    Report(
        name="stages",
        title=f"per-item cost by stage, median of {repeats} (model dir: {model_dir})",
        columns=columns,
        rows=rows,
        notes=[
            "sandbox start is paid once per decoder child (children are reused and "
            "pre-started while the models load); evidence is paid only by alerting items",
        ],
        params={"repeats": repeats, "clips": extra},
    ).save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
