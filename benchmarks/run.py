"""Run the benchmark set one script after another and summarise every result as markdown.

    python -m benchmarks.run [--quick] [--only sampling,batcher]

Each script runs in its own process (a fresh peak RSS, no warm caches shared between
them) and writes `benchmarks/results/<name>.json`; this then writes
`benchmarks/results/summary.md`, the tables `docs/PERFORMANCE.md` quotes. Scripts run
one at a time on purpose: two benchmarks sharing 2 cores would measure each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, ROOT, fmt

# Order: the hot paths first, end to end last.
SCRIPTS = (
    "sampling",
    "hashing",
    "inference",
    "batcher",
    "match",
    "store",
    "startup",
    "stages",
    "e2e",
    "clips",
    "kafka",
    "soak",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the minutes-long set")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SCRIPTS))
    args = parser.parse_args(argv)
    chosen = [s for s in SCRIPTS if not args.only or s in args.only.split(",")]
    failed = []
    for name in chosen:
        script = ROOT / "benchmarks" / f"bench_{name}.py"
        if not script.is_file():
            print(f"benchmarks: {script.name} is missing", file=sys.stderr)
            failed.append(name)
            continue
        cmd = [
            sys.executable,
            "-m",
            f"benchmarks.bench_{name}",
            *(["--quick"] if args.quick else []),
        ]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"== bench_{name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    summary = RESULTS / "summary.md"
    summary.write_text(markdown(RESULTS))
    print(f"wrote {summary.relative_to(ROOT)}")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def markdown(results: Path) -> str:
    """Every result file as a markdown table plus its targets, machine and commit."""
    parts = []
    for path in sorted(results.glob("*.json")):
        data: dict[str, Any] = json.loads(path.read_text())
        if "columns" not in data:
            continue  # e.g. gpu_check.json, summarised by hand in docs/PERFORMANCE.md
        m = data.get("machine", {})
        parts.append(f"### {data.get('title', data['name'])}\n")
        dirty = " (dirty)" if m.get("dirty") else ""
        parts.append(
            f"`{path.name}`: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, commit "
            f"`{m.get('commit', '?')}`{dirty}, {m.get('date', '?')}\n"
        )
        cols = data["columns"]
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for row in data["rows"]:
            parts.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
        parts.append("")
        for t in data.get("targets", []):
            op = ">=" if t["at_least"] else "<="
            verdict = "met" if t["met"] else "**not met**"
            parts.append(f"- target {t['name']}: {t['value']:.3g} {op} {t['bound']:g}: {verdict}")
        for note in data.get("notes", []):
            parts.append(f"- {note}")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
