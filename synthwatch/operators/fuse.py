"""Fuse per-frame detector scores into one `synthetic_score` and the segments behind it.

Temporal aggregation is a top-k mean: the mean of the k highest frame scores, with k a
quarter of the sampled frames (at least one). A face swap often covers only part of a
clip, so a plain mean over all frames dilutes it; a plain max lets one noisy frame
decide. Top-k mean sits between, as in the video-level aggregation used by most
deepfake benchmarks (e.g. DeepfakeBench's video AUC uses per-video averaging of frame
scores). The frames that entered the top k, merged where adjacent, are the segments
that drove the score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from synthwatch.schemas import FrameResult, Segment


def top_k(n: int, fraction: float = 0.25) -> int:
    return max(1, math.ceil(n * fraction))


def frame_spans(times: Sequence[float], duration_s: float) -> list[tuple[float, float]]:
    """The stretch of time each sampled frame stands for: halfway to its neighbours."""
    if not times:
        return []
    end = max(duration_s, times[-1])
    spans = []
    for i, t in enumerate(times):
        lo = 0.0 if i == 0 else (times[i - 1] + t) / 2
        hi = end if i == len(times) - 1 else (t + times[i + 1]) / 2
        spans.append((lo, hi))
    return spans


def aggregate(frames: Sequence[FrameResult], duration_s: float) -> tuple[float, list[Segment]]:
    """(synthetic score in [0, 1], segments that drove it, in time order).

    No frames means nothing was scored: score 0.0 with no segments; the caller
    records why (e.g. an audio-only item before audio detectors exist).
    """
    if not frames:
        return 0.0, []
    ordered = sorted(frames, key=lambda f: f.time_s)
    k = top_k(len(ordered))
    chosen = sorted(range(len(ordered)), key=lambda i: ordered[i].score, reverse=True)[:k]
    score = sum(ordered[i].score for i in chosen) / k
    spans = frame_spans([f.time_s for f in ordered], duration_s)
    segments: list[Segment] = []
    run: list[int] = []
    for i in sorted(chosen):
        if run and i != run[-1] + 1:
            segments.append(_segment(ordered, spans, run))
            run = []
        run.append(i)
    if run:
        segments.append(_segment(ordered, spans, run))
    return min(1.0, max(0.0, score)), segments


def _segment(
    frames: Sequence[FrameResult], spans: Sequence[tuple[float, float]], run: Sequence[int]
) -> Segment:
    return Segment(
        start_s=round(spans[run[0]][0], 3),
        end_s=round(spans[run[-1]][1], 3),
        score=max(frames[i].score for i in run),
    )
