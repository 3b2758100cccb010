"""How often do unrelated items match? PDQ distances between every pair of distinct
items of ../shared/media, at the thresholds matching uses.

Every still is PDQ-hashed; every video and animation gets its vPDQ (a frame a second,
decoded in the sandbox), and each of its frames is compared as a still would be. For
every pair of distinct items the smallest distance between any of their hashes of
quality >= 50 is kept, and the pairs at or under each threshold are listed by name: a
"match" between two files of the set is either a true near-duplicate (one made from the
other) or a false match, which the listing lets a reader tell apart.

    python scripts/pdq_false_matches.py [--shared ../shared] [--out results.json]

Docs: docs/MATCHING.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from synthwatch.operators import phash, sandbox
from synthwatch.operators.hashindex import pack_hex
from synthwatch.operators.sample import SampleSettings
from synthwatch.operators.sniff import MEDIA_SUFFIXES

THRESHOLDS = (31, 45, 63)


def item_hashes(path: Path, settings: SampleSettings) -> list[str]:
    sampled = sandbox.sample(path, settings.model_copy(update={"frames": 1}))
    if sampled.media_type == "audio":
        return []
    if sampled.media_type == "video":
        hashes = sandbox.vpdq(path, settings)
        return sorted({h.hash for h in hashes if h.quality >= phash.MIN_QUALITY})
    digest, quality = phash.pdq(sampled.frames[0].image)
    return [digest] if quality >= phash.MIN_QUALITY else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    media = args.shared / "media"
    if not media.is_dir():
        print(f"no media at {media}", file=sys.stderr)
        return 2
    settings = SampleSettings()
    files = sorted(
        p for p in media.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES
    )
    items: dict[str, np.ndarray] = {}
    low_quality: list[str] = []
    for path in files:
        try:
            hashes = item_hashes(path, settings)
        except Exception as exc:  # a file the sampler refuses is reported, not fatal
            print(f"skipped {path.relative_to(media)}: {exc}", file=sys.stderr)
            continue
        name = str(path.relative_to(media))
        if hashes:
            items[name] = pack_hex(hashes)
        elif path.suffix.lower() not in (".mp3", ".wav", ".flac", ".ogg", ".m4a"):
            low_quality.append(name)
    names = sorted(items)
    nearest: dict[tuple[str, str], int] = {}
    for a, b in combinations(names, 2):
        x = items[a][:, None, :] ^ items[b][None, :, :]
        nearest[(a, b)] = int(np.bitwise_count(x).sum(axis=2).min())
    distances = np.array(sorted(nearest.values()))
    ranked = sorted(nearest.items(), key=lambda kv: kv[1])
    within = {t: [(a, b, d) for (a, b), d in ranked if d <= t] for t in THRESHOLDS}
    closest = [(a, b, d) for (a, b), d in ranked[:12]]
    report: dict[str, Any] = {
        "items": len(names),
        "hashes": int(sum(len(v) for v in items.values())),
        "pairs": len(nearest),
        "no_usable_hash": low_quality,
        "nearest_distance_percentiles": {
            str(q): float(np.percentile(distances, q)) for q in (0, 0.1, 1, 5, 50)
        },
        "nearest_pairs": closest,
        "pairs_within": {str(t): pairs for t, pairs in within.items()},
    }
    print(f"{len(names)} items, {report['hashes']} hashes, {len(nearest)} pairs")
    print(
        "nearest distance between two items, percentiles:", report["nearest_distance_percentiles"]
    )
    for t, pairs in within.items():
        print(f"pairs within {t} bits: {len(pairs)}")
        for a, b, d in pairs:
            print(f"  {d:3d}  {a}  ~  {b}")
    print("the 12 nearest pairs:")
    for a, b, d in closest:
        print(f"  {d:3d}  {a}  ~  {b}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
