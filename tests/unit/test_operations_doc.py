"""docs/OPERATIONS.md's metric table names what the workers serve: k8s/metrics.txt, the
list the dashboard and the running-worker integration test are held to."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> dict[str, tuple[str, str]]:
    out = {}
    for line in (ROOT / "k8s" / "metrics.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            out[fields[0]] = (fields[1], fields[2] if len(fields) > 2 else "")
    return out


def test_the_runbook_documents_every_served_metric_with_its_type_and_labels() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    rows = re.findall(r"^\| `(synthwatch_\w+)` \| (\w+) \| ([^|]*) \|", text, re.MULTILINE)
    documented = {
        name: (kind, ",".join(label.strip() for label in labels.split(",") if label.strip()))
        for name, kind, labels in rows
    }
    assert documented == _listed()
