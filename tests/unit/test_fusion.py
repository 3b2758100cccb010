"""Calibration and fusion: how the ensemble's signals become one score and a decision."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from synthwatch.errors import InvalidInput
from synthwatch.operators import calibrate as cal
from synthwatch.operators import fuse
from synthwatch.operators.policy import Policy
from synthwatch.schemas import Signal

POLICY = Policy(version="p", flag_threshold=0.8, review_threshold=0.5)


def sig(name: str, score: float, modality: str = "face", **kw: object) -> Signal:
    return Signal(name=name, model=f"{name}@abc", score=score, weight=1.0, modality=modality, **kw)  # type: ignore[arg-type]


def test_platt_calibration_is_monotone_and_separates_the_classes() -> None:
    rng = np.random.default_rng(0)
    real = rng.uniform(0.85, 0.95, 40)  # an over-confident model: reals near 0.9
    fake = rng.uniform(0.95, 0.999, 40)
    c = cal.fit("m", "m@abc", [*real, *fake], [0] * 40 + [1] * 40)
    xs = np.linspace(0.5, 0.999, 50)
    ys = [c.apply(float(x)) for x in xs]
    assert all(b >= a for a, b in itertools.pairwise(ys))
    assert c.apply(0.9) < 0.5 < c.apply(0.99)


def test_isotonic_calibration_stays_in_range_and_flat_past_the_data() -> None:
    c = cal.fit("m", "m@abc", [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1], method="isotonic")
    assert c.apply(0.0) == pytest.approx(0.0) and c.apply(1.0) == pytest.approx(1.0)
    assert c.apply(0.25) <= c.apply(0.75)


def test_fitting_needs_both_classes_and_finite_scores() -> None:
    with pytest.raises(ValueError, match="2 real and 2 fake"):
        cal.fit("m", "m@abc", [0.1, 0.2, 0.9], [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        cal.fit("m", "m@abc", [0.1, float("nan"), 0.8, 0.9], [0, 0, 1, 1])


def test_calibration_file_round_trips_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    c = cal.fit("m", "m@abc", [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    path = tmp_path / "cal.json"
    cal.save(cal.new([c], ["labels.csv"]), path)
    back = cal.load(path)
    assert back.get("m", "m@abc") == c
    assert back.get("m", "m@other") is None  # bound to the exact model version
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not a calibration file"):
        cal.load(tmp_path / "bad.json")
    with pytest.raises(InvalidInput, match=r"missing\.json"):
        cal.load(tmp_path / "missing.json")


def test_signals_are_calibrated_once_and_can_be_recalibrated() -> None:
    c = cal.fit("m", "m@abc", [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    once = fuse.calibrate([sig("m", 0.85)], cal.new([c], []))
    twice = fuse.calibrate(once, cal.new([c], []))
    assert once == twice and once[0].calibrated and once[0].raw_score == 0.85
    undone = fuse.calibrate(once, cal.EMPTY)
    assert undone[0].score == 0.85 and not undone[0].calibrated


def test_models_of_one_modality_average_and_modalities_add_evidence() -> None:
    one = fuse.combine([sig("face_a", 0.9), sig("face_b", 0.5)])
    assert one.score == pytest.approx(0.75)  # mean log-odds of 0.9 and 0.5
    assert one.decided_by == ["face_a", "face_b"]
    # A cloned voice over a real-looking face: the voice's evidence wins.
    fused = fuse.combine([sig("face_a", 0.2), sig("voice", 0.95, "audio")])
    assert fused.score > 0.8 and fused.decided_by == ["voice"]
    assert POLICY.decide(fused.score) == "flag"
    # A modality whose calibrated score equals the prior is no evidence either way.
    base = fuse.combine([sig("face_a", 0.7)], prior=0.3)
    with_flat = fuse.combine([sig("face_a", 0.7), sig("fp", 0.3, "image")], prior=0.3)
    assert with_flat.score == pytest.approx(base.score)
    # Two modalities that agree are stronger together than either alone.
    both = fuse.combine([sig("face_a", 0.7), sig("fp", 0.7, "image")])
    assert both.score > 0.8


def test_a_detector_inverted_on_the_calibration_data_becomes_uninformative() -> None:
    c = cal.fit("m", "m@abc", [0.9, 0.8, 0.2, 0.1, 0.15], [0, 0, 1, 1, 1])
    assert c.a == 0.0
    assert c.apply(0.05) == pytest.approx(0.6) and c.apply(0.95) == pytest.approx(0.6)


def test_uncalibrated_forensic_features_are_reported_not_fused() -> None:
    fused = fuse.combine([sig("residual_spectrum", 7.5, "image"), sig("face_a", 0.1)])
    assert fused.score == pytest.approx(0.1) and fused.decided_by == ["face_a"]
    c = cal.fit(
        "residual_spectrum",
        "residual_spectrum@abc",
        [1, 2, 8, 9],
        [0, 0, 1, 1],
        transform="identity",
    )
    signals = fuse.calibrate([sig("residual_spectrum", 7.5, "image")], cal.new([c], []))
    assert fuse.combine(signals).decided_by == ["residual_spectrum"]


def test_valid_ai_manifest_decides_and_invalid_manifest_is_a_finding() -> None:
    ai = sig("c2pa", 1.0, "provenance", decides="flag")
    fused = fuse.combine([ai, sig("face_a", 0.01)])
    assert (fused.score, fused.decided_by) == (1.0, ["c2pa"])
    assert POLICY.decide(fused.score, minimum=fused.minimum) == "flag"
    broken = Signal(
        name="c2pa", model="c", score=0.0, weight=0.0, modality="provenance", decides="review"
    )
    fused = fuse.combine([broken, sig("face_a", 0.01)])
    assert POLICY.decide(fused.score, minimum=fused.minimum) == "review"
    # The signal that forced the decision is named beside the one that set the score.
    assert fused.decided_by == ["face_a", "c2pa"]


def test_nothing_scored_is_inconclusive_with_no_score() -> None:
    fused = fuse.combine([])
    assert not fused.scored and fused.score is None and fused.decided_by == []
    assert POLICY.decide(fused.score, minimum=fused.minimum) == "inconclusive"
    # Reported-only signals (an uncalibrated forensic feature, a valid C2PA manifest that
    # declares nothing) are no measurement either.
    reported = [
        Signal(name="spectral_grid", model="g", score=0.9, weight=1.0, modality="image"),
        Signal(name="c2pa", model="c", score=0.0, weight=0.0, modality="provenance"),
    ]
    fused = fuse.combine(reported)
    assert fused.score is None
    assert POLICY.decide(fused.score, minimum=fused.minimum) == "inconclusive"


def test_a_failed_c2pa_validation_alone_forces_review_without_inventing_a_score() -> None:
    broken = Signal(
        name="c2pa", model="c", score=0.0, weight=0.0, modality="provenance", decides="review"
    )
    fused = fuse.combine([broken])
    assert fused.score is None and fused.decided_by == ["c2pa"]
    assert POLICY.decide(fused.score, minimum=fused.minimum) == "review"


def test_audio_windows_aggregate_with_segments() -> None:
    score, segments = fuse.aggregate_scores([0.0, 4.0, 8.0, 12.0], [0.1, 0.9, 0.95, 0.2], 16.0)
    assert score == pytest.approx(0.95)  # top quarter of 4 windows: the best one
    assert [(s.start_s, s.end_s) for s in segments] == [(6.0, 10.0)]
