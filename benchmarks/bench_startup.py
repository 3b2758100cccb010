"""Start-up and install size of the scanner a user installs, against the issue's limits.

usage: python -m benchmarks.bench_startup [--quick]

Issue 18: `pip install synthwatch` under 1 GB and without torch; `synthwatch scan` of a
missing file answers in under 1 s; a one-image scan takes under 2 s wall on this
machine. Measured here, in one run:

- the environment: the one whose python SYNTHWATCH_SCAN_PYTHON names (`make bench`
  points it at the runtime .venv), else this one; its size on disk (`du` of its
  prefix) and whether torch is importable in it;
- `synthwatch scan <missing file>`: wall time of the whole command, interpreter start
  included, best and median of the repeats;
- `synthwatch scan <one image>` (a 1024x768 JPEG generated here, so the scene probe,
  the fingerprint net, face detection and the forensic features all run), same;
  SYNTHWATCH_MODEL_DIR as `make scan` sets it.

Ratios are measured / limit: at most 1 meets the goal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import Report, Target, console
from benchmarks.bench_clips import scan_command, scan_env

LIMITS = {"missing": 1.0, "image": 2.0, "size_mb": 1024.0}


def _wall(cmd: list[str], env: dict[str, str], expect: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(
            f"{' '.join(cmd)}: exit {proc.returncode}, expected {expect}\n{proc.stderr[-2000:]}"
        )
    return wall


def _prefix(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def _size_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="5 repeats (else 9)")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 9

    python = Path(os.environ.get("SYNTHWATCH_SCAN_PYTHON") or sys.executable)
    prefix = _prefix(python)
    size = _size_mb(prefix)
    has_torch = (
        subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)",
            ],
            check=False,
        ).returncode
        == 0
    )
    env, model_dir = scan_env()
    cmd = scan_command()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        image = Path(tmp) / "photo.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(
            image, quality=90
        )
        missing = [*cmd, "scan", str(Path(tmp) / "missing.jpg")]
        one = [*cmd, "scan", str(image), "--json", str(Path(tmp) / "v.jsonl")]
        _wall(one, env, 0)  # warm the page cache once, not counted
        walls: dict[str, list[float]] = {"missing": [], "image": []}
        for _ in range(repeats):
            walls["missing"].append(_wall(missing, env, 1))
            walls["image"].append(_wall(one, env, 0))

    rows = [
        {
            "measure": "scan of a missing file (s)",
            "best": min(walls["missing"]),
            "median": statistics.median(walls["missing"]),
            "limit": LIMITS["missing"],
            "best / limit": min(walls["missing"]) / LIMITS["missing"],
        },
        {
            "measure": "scan of one 1024x768 JPEG (s)",
            "best": min(walls["image"]),
            "median": statistics.median(walls["image"]),
            "limit": LIMITS["image"],
            "best / limit": min(walls["image"]) / LIMITS["image"],
        },
        {
            "measure": "runtime environment on disk (MB)",
            "best": size,
            "median": size,
            "limit": LIMITS["size_mb"],
            "best / limit": size / LIMITS["size_mb"],
        },
    ]
    Report(
        name="startup",
        title=f"start-up and install size of {prefix} (torch installed: {has_torch})",
        columns=["measure", "best", "median", "limit", "best / limit"],
        rows=rows,
        targets=[
            Target("missing-file scan / 1 s", rows[0]["median"] / LIMITS["missing"], 1.0, False),
            Target("one-image scan / 2 s", rows[1]["median"] / LIMITS["image"], 1.0, False),
            Target("environment / 1 GB", size / LIMITS["size_mb"], 1.0, False),
        ],
        notes=[f"model dir {model_dir}; torch importable in the environment: {has_torch}"],
        params={"repeats": repeats, "prefix": str(prefix), "command": cmd, "torch": has_torch},
    ).save()
    console.print("targets compare the median; the best is listed for reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
