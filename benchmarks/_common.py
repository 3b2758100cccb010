"""What every benchmark shares: the machine record, timing, the table and the JSON.

Rules the scripts follow (benchmarks/README.md): ours and its comparison are measured in
the same run, interleaved, and reported as a ratio; absolute times from different runs
are not compared (a machine of this kind drifts 25-35% within an hour, PERF_NOTES.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Wide enough for the tables when stdout is a file or a pipe (rich would wrap at 80).
console = Console(stderr=False, width=200)


def machine() -> dict[str, Any]:
    """The machine and code a result came from: CPU model, cores, versions, commit."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):  # no /proc: keep platform's answer
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for mod in ("torch", "onnxruntime", "av", "numpy", "aiokafka", "faust"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is simply not listed
            continue
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": versions,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@dataclass
class Timed:
    wall_s: float
    cpu_s: float
    """CPU seconds of this process and of the children it waited for."""


def timed(fn: Callable[[], Any]) -> tuple[Any, Timed]:
    """Run `fn` once: (its result, wall and CPU time)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) + (
        c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    )
    return out, Timed(wall, cpu)


def median_timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, Timed]:
    """Median wall and CPU time of `repeats` runs (the result of the last)."""
    runs = [timed(fn) for _ in range(max(1, repeats))]
    return runs[-1][0], Timed(
        statistics.median(t.wall_s for _, t in runs), statistics.median(t.cpu_s for _, t in runs)
    )


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Target:
    """One target of the issue: the measured ratio, the bound, and which way it goes."""

    name: str
    value: float
    bound: float
    at_least: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound


@dataclass
class Report:
    name: str
    title: str
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: Path = RESULTS) -> Path:
        """Print the table and the targets; write `<out_dir>/<name>.json`."""
        table = Table(title=self.title, title_justify="left")
        for col in self.columns:
            table.add_column(col, justify="left" if col == self.columns[0] else "right")
        for row in self.rows:
            table.add_row(*(fmt(row.get(c)) for c in self.columns))
        console.print(table)
        for t in self.targets:
            mark = "[green]met[/]" if t.met else "[red]NOT met[/]"
            op = ">=" if t.at_least else "<="
            console.print(f"target {t.name}: {t.value:.3g} {op} {t.bound:g}: {mark}")
        for note in self.notes:
            console.print(f"note: {note}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.json"
        payload = {
            "name": self.name,
            "title": self.title,
            "machine": machine(),
            "params": self.params,
            "columns": list(self.columns),
            "rows": self.rows,
            "targets": [
                {
                    "name": t.name,
                    "value": t.value,
                    "bound": t.bound,
                    "at_least": t.at_least,
                    "met": t.met,
                }
                for t in self.targets
            ],
            "notes": self.notes,
        }
        path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        console.print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path


def fmt(value: Any) -> str:
    """A table cell: 3 significant digits, thousands separated, "-" for nothing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# --------------------------------------------------------------------------- CPU time


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of the children it reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = sum(int(f) for f in fields[11:15]) / tick
        table[int(entry.name)] = (int(fields[1]), cpu)
    return table


def tree_cpu_s(pid: int, table: dict[int, tuple[int, float]] | None = None) -> float:
    """CPU seconds used so far by `pid` and every live descendant (a worker and its
    decoder sandbox children), including the children they reaped."""
    table = proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for child, (parent, _cpu) in table.items():
        kids.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in table:
            total += table[p][1]
        todo.extend(kids.get(p, []))
    return total
