"""Fuse detector scores over time, then signals over models and modalities.

Two steps. `aggregate` turns one model's per-frame (or per-window) scores into an item
score and the segments behind it. `combine` turns the item's signals into one
`synthetic_score`: each signal is calibrated (`operators.calibrate`), the log-odds of
the signals of one modality (face crops, whole-image patches, audio windows, metadata)
are averaged by weight, since models of one modality see the same pixels and are not
independent evidence, and the modalities combine as independent evidence: each adds
its log-likelihood ratio against the calibration's prior (the fraction of fakes it was
fitted on), naive-Bayes style. A modality whose calibrated score equals the prior
(an uninformative detector) changes nothing; one that is confident either way moves
the score, so a cloned voice over a real face still ends high. Signals that decide on
their own (a valid C2PA manifest declaring synthetic media) override the models; a
C2PA manifest that fails validation is a finding in itself and lifts the decision to
at least `review`.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from msgspec.structs import replace

from synthwatch.operators.calibrate import Calibration, logit
from synthwatch.schemas import Decision, Modality, Segment, Signal

FUSED_MODALITIES: tuple[Modality, ...] = ("face", "image", "audio", "metadata")
NOT_PROBABILITIES = frozenset({"ela", "residual_spectrum", "spectral_grid"})
"""Forensic features whose raw value is not a probability: they enter fusion only once
calibrated (Platt on the raw value); until then they are reported, not fused."""


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


@dataclass(frozen=True)
class Fused:
    score: float | None
    """The fused synthetic score; None when no signal entered fusion and none decided:
    nothing was measured, and no number may stand for that."""
    minimum: Decision | None
    """The lowest decision the signals allow (`review` for a failed C2PA validation)."""
    decided_by: list[str]
    """Every signal that set the score or forced the decision: the decisive ones, else
    the strongest modality's, plus any that set a minimum decision."""

    @property
    def scored(self) -> bool:
        return self.score is not None


def calibrate(signals: Sequence[Signal], calibration: Calibration) -> list[Signal]:
    """Each signal's score from its raw score through its model's calibrator, if fitted.

    The signal's segments go through the same calibrator: a segment's score is the peak
    frame (or window) score in its stretch, and the timeline shows each frame calibrated,
    so a raw segment would give one frame two numbers (0.98 in the segments, 0.78 on the
    frame). Calibrators are monotone, so the calibrated peak is the peak of the
    calibrated frames.

    Idempotent: the raw scores are kept in `raw_score`, and calibrating an already
    calibrated signal starts again from them, so a verdict can be re-scored under another
    calibration (`synthwatch eval` does, per cross-validation fold). Decisive signals are
    never calibrated: they are facts, not scores.
    """
    out: list[Signal] = []
    for sig in signals:
        raw = sig.score if sig.raw_score is None else sig.raw_score
        cal = calibration.get(sig.name, sig.model) if not sig.decides else None
        if cal is None:
            segments = [_rescored(seg, lambda v: v) for seg in sig.segments]
            out.append(replace(sig, score=raw, raw_score=raw, calibrated=False, segments=segments))
        else:
            score = round(cal.apply(raw), 6)
            segments = [_rescored(seg, cal.apply) for seg in sig.segments]
            out.append(replace(sig, score=score, raw_score=raw, calibrated=True, segments=segments))
    return out


def _rescored(segment: Segment, apply: Callable[[float], float]) -> Segment:
    """`segment` with its score recomputed from its raw score by `apply`."""
    raw = segment.score if segment.raw_score is None else segment.raw_score
    return replace(segment, score=round(apply(raw), 6), raw_score=raw)


def fused(signal: Signal) -> bool:
    """Whether a signal enters the fused score (rather than only being reported)."""
    return (
        signal.weight > 0
        and signal.modality in FUSED_MODALITIES
        and (signal.calibrated or signal.name not in NOT_PROBABILITIES)
    )


def combine(signals: Sequence[Signal], *, prior: float = 0.5) -> Fused:
    """One synthetic score from calibrated signals (see the module docstring).

    The score is None when no signal entered fusion and none decided; a signal that only
    sets a minimum decision (a C2PA manifest failing validation) forces that decision
    without inventing a score.
    """
    decisive = [s for s in signals if s.decides == "flag"]
    floors = [s.name for s in signals if s.decides == "review"]
    minimum: Decision | None = "review" if floors else None
    if decisive:
        return Fused(score=1.0, minimum="flag", decided_by=[s.name for s in decisive])
    base = logit(prior)
    z, evidence = base, []
    for modality in FUSED_MODALITIES:
        members = [s for s in signals if s.modality == modality and fused(s)]
        if not members:
            continue
        total = sum(s.weight for s in members)
        z_m = sum(logit(s.score) * s.weight for s in members) / total
        z += z_m - base
        evidence.append((z_m - base, [s.name for s in members]))
    if not evidence:
        return Fused(score=None, minimum=minimum, decided_by=floors)
    strongest = max(evidence, key=lambda e: e[0])[1]
    score = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return Fused(
        score=score,
        minimum=minimum,
        decided_by=strongest + [n for n in floors if n not in strongest],
    )


def aggregate_scores(
    times: Sequence[float], scores: Sequence[float], duration_s: float
) -> tuple[float, list[Segment]]:
    """Top-k mean of scores observed at `times` (frames, or audio window starts)."""
    if len(times) != len(scores):
        raise ValueError("times and scores differ in length")
    if not scores:
        return 0.0, []
    order = sorted(range(len(times)), key=lambda i: times[i])
    t = [times[i] for i in order]
    v = [scores[i] for i in order]
    k = top_k(len(v))
    chosen = sorted(range(len(v)), key=lambda i: v[i], reverse=True)[:k]
    score = sum(v[i] for i in chosen) / k
    spans = frame_spans(t, duration_s)
    segments: list[Segment] = []
    run: list[int] = []
    for i in sorted(chosen):
        if run and i != run[-1] + 1:
            segments.append(_segment(v, spans, run))
            run = []
        run.append(i)
    if run:
        segments.append(_segment(v, spans, run))
    return min(1.0, max(0.0, score)), segments


def _segment(
    scores: Sequence[float], spans: Sequence[tuple[float, float]], run: Sequence[int]
) -> Segment:
    return Segment(
        start_s=round(spans[run[0]][0], 3),
        end_s=round(spans[run[-1]][1], 3),
        score=max(scores[i] for i in run),
    )
