"""The benchmark report plumbing: what a reader of benchmarks/results gets."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks._common import Report, Target
from benchmarks.run import markdown


def test_a_report_saves_rows_targets_and_the_machine_then_renders_as_markdown(
    tmp_path: Path,
) -> None:
    report = Report(
        name="demo",
        title="Demo: ours against the baseline",
        columns=["case", "ours items/s", "ratio"],
        rows=[{"case": "1080p", "ours items/s": 12.5, "ratio": 8.4}],
        targets=[
            Target("adaptive vs full decode", 8.4, 8.0),
            Target("rss growth", 0.07, 0.05, False),
        ],
    )
    saved = json.loads(report.save(tmp_path).read_text())
    assert saved["rows"] == [{"case": "1080p", "ours items/s": 12.5, "ratio": 8.4}]
    assert [t["met"] for t in saved["targets"]] == [True, False]
    assert saved["machine"]["cores"] >= 1 and "commit" in saved["machine"]

    text = markdown(tmp_path)
    assert "### Demo: ours against the baseline" in text
    assert "| 1080p | 12.5 | 8.4 |" in text
    assert "rss growth: 0.07 <= 0.05: **not met**" in text
