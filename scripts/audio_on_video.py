"""AASIST on video soundtracks: per labelled video, the raw spoof score of its soundtrack
and the verdict with SYNTHWATCH_MODELS__AUDIO_ON_VIDEO off and on (docs/EVALUATION.md,
"Audio on video").

    SYNTHWATCH_MODEL_DIR=../shared/weights .venv/bin/python scripts/audio_on_video.py \\
        ../shared/media/dev/labels.csv

Prints a Markdown table. Uses the shipped calibration and the default ensemble.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from synthwatch.pipeline.cli import load_settings
from synthwatch.pipeline.scan import scan_all
from synthwatch.train.labels import read_labels

VIDEO = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".webp")


def main(labels: Path) -> None:
    items = [i for i in read_labels(labels) if i.path.suffix.lower() in VIDEO]
    runs: dict[bool, list[Any]] = {}
    for on in (False, True):
        settings = load_settings(models__audio_on_video=on)
        runs[on] = scan_all(settings, [str(i.path) for i in items], workers=2)
    print("| clip | label | AASIST raw (spoof) | off | on |")
    print("|---|---|---:|---|---|")
    for item, off, on in zip(items, runs[False], runs[True], strict=True):
        audio = [s for s in (on.verdict.signals if on.verdict else []) if s.modality == "audio"]
        raw = f"{audio[0].raw_score:.3f}" if audio else "no soundtrack"
        print(
            f"| `{item.rel}` | {'fake' if item.label else 'real'} | {raw} | {_v(off)} | {_v(on)} |"
        )


def _v(result: Any) -> str:
    if result.verdict is None:
        return f"error: {result.reason}"
    score = result.verdict.synthetic_score
    return f"{'-' if score is None else f'{score:.3f}'} {result.verdict.decision}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
