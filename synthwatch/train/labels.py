"""Labelled media sets: a CSV with columns `path,label` (label `real` or `fake`, paths
relative to the CSV) and an optional `group` column naming each item's source or
generator family. `synthwatch train scene` learns from such sets; `synthwatch eval` and
`synthwatch calibrate` measure on them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from synthwatch.errors import InvalidInput

LABELS = {"real": 0, "fake": 1}


@dataclass(frozen=True)
class Labelled:
    path: Path
    rel: str
    """The path as written in the CSV."""
    label: int
    """1 = fake, 0 = real."""
    group: str = ""
    """The item's source or generator family (the CSV's `group` column, else
    `group_of(rel)`), for the per-source table."""


def group_of(rel: str) -> str:
    """A source or generator family from a path, for sets that name files after where
    they came from: the folder, then the file name up to its first `_` (else without
    its trailing digits). `ai/diffusion3_7.jpg` -> `ai/diffusion3`, `fake/df00204.jpg`
    -> `fake/df`, `real/liveportrait_d11.mp4` -> `real/liveportrait`."""
    path = Path(rel)
    stem = path.stem
    head = stem.split("_")[0] if "_" in stem else stem.rstrip("0123456789") or stem
    parent = path.parent.as_posix()
    return head if parent in ("", ".") else f"{parent}/{head}"


def read_labels(csv_path: Path) -> list[Labelled]:
    """The labelled items. Raises InvalidInput listing every problem (columns, labels,
    missing files) at once, so one run fixes the whole file. An optional `group`
    column names each item's source or generator family."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidInput(f"{csv_path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in reader.fieldnames or []]
    if "path" not in fields or "label" not in fields:
        raise InvalidInput(f"{csv_path}: needs the columns path,label; found {fields or 'none'}")
    items, problems = [], []
    for line, row in enumerate(reader, start=2):
        rel = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip().lower()
        if not rel:
            problems.append(f"line {line}: empty path")
            continue
        if label not in LABELS:
            problems.append(f"line {line}: label {label!r} is not real or fake")
            continue
        path = (csv_path.parent / rel).resolve()
        if not path.is_file():
            problems.append(f"line {line}: {rel}: no such file")
            continue
        group = (row.get("group") or "").strip() or group_of(rel)
        items.append(Labelled(path=path, rel=rel, label=LABELS[label], group=group))
    if problems:
        raise InvalidInput(f"{csv_path}: " + "; ".join(problems))
    if not items:
        raise InvalidInput(f"{csv_path}: no items")
    return items
