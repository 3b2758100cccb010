"""Per-model calibration: turn each detector's raw item score into a probability of fake.

Detectors disagree about what a score means: Meso-4 puts most real faces it has never
seen near 0.99, AASIST's softmax saturates, and a forensic feature such as the residual
spectrum's peak ratio is not a probability at all. Fusing them needs a common scale, so
each signal gets its own monotone map fitted on labelled items:

- Platt scaling (Platt 1999): a logistic regression on the score (on its logit when
  the score is a probability). Two parameters, so it is the default for the small
  labelled sets a newsroom or SOC team has; scikit-learn's `LogisticRegression` fits
  it, with its default L2 penalty acting as shrinkage on a few dozen items.
- Isotonic regression (Zadrozny & Elkan 2002): a free-form monotone step function;
  better with hundreds of items per class, overfits below that.

A Platt fit with a negative slope (the detector ranks this data's fakes below its reals)
is replaced by the constant base rate: a detector is not trusted to be inverted on a
few dozen items, so it becomes uninformative instead.

A calibrator is bound to the exact model version it was fitted on (`model`, which
carries the weights' sha256 prefix): a changed model is uncalibrated until refitted,
never silently mis-calibrated. Calibration is monotone per model, so it never changes a
single model's AUC; it changes how models combine and where the policy threshold cuts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from synthwatch.errors import InvalidInput

Method = Literal["platt", "isotonic"]
Transform = Literal["logit", "identity"]

CALIBRATION_VERSION = "calibration.v1"
_EPS = 1e-6


def logit(p: float) -> float:
    p = min(1.0 - _EPS, max(_EPS, p))
    return math.log(p / (1.0 - p))


class Calibrator(msgspec.Struct, frozen=True, kw_only=True):
    signal: str
    """Signal name, e.g. `sbi_face`."""
    model: str
    """Exact model version it was fitted on, e.g. `sbi_face@1a2b3c4d5e6f`."""
    method: Method
    transform: Transform = "logit"
    a: float = 1.0
    b: float = 0.0
    """Platt: p = sigmoid(a * t(score) + b)."""
    x: list[float] = []
    y: list[float] = []
    """Isotonic: knots of the monotone map, interpolated linearly, flat past the ends."""
    n: int = 0
    n_fake: int = 0

    def apply(self, score: float) -> float:
        if not math.isfinite(score):
            raise ValueError(f"{self.signal}: cannot calibrate a non-finite score {score}")
        if self.method == "isotonic":
            return float(np.interp(score, self.x, self.y))
        t = logit(score) if self.transform == "logit" else score
        z = self.a * t + self.b
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class Calibration(msgspec.Struct, frozen=True, kw_only=True):
    version: str = CALIBRATION_VERSION
    created_at: float = 0.0
    fitted_on: list[str] = []
    """What the calibrators were fitted on: label files with their sha256."""
    calibrators: list[Calibrator] = []
    prior: float = 0.5
    """Fraction of fakes in the fitting data: the fused score every uninformative signal
    leaves unchanged (see `fuse.combine`)."""

    def get(self, signal: str, model: str) -> Calibrator | None:
        """The calibrator fitted on exactly this model version, if any."""
        for c in self.calibrators:
            if c.signal == signal and c.model == model:
                return c
        return None


EMPTY = Calibration()


def fit(
    signal: str,
    model: str,
    scores: Sequence[float],
    labels: Sequence[int],
    *,
    method: Method = "platt",
    transform: Transform = "logit",
) -> Calibrator:
    """Fit one signal's calibrator on item scores and labels (1 = fake, 0 = real).

    Raises ValueError when the data cannot support a fit: fewer than two items of
    either class, or non-finite scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"{signal}: scores and labels must be two lists of the same length")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{signal}: scores contain NaN or infinity")
    n_fake = int(y.sum())
    if n_fake < 2 or len(y) - n_fake < 2:
        raise ValueError(
            f"{signal}: calibration needs at least 2 real and 2 fake items, "
            f"got {len(y) - n_fake} real and {n_fake} fake"
        )
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(s, y)
        return Calibrator(
            signal=signal,
            model=model,
            method="isotonic",
            transform="identity",
            x=[float(v) for v in iso.X_thresholds_],
            y=[float(v) for v in iso.y_thresholds_],
            n=len(y),
            n_fake=n_fake,
        )
    from sklearn.linear_model import LogisticRegression

    t = np.array([logit(v) for v in s]) if transform == "logit" else s
    lr = LogisticRegression(C=1.0)
    lr.fit(t.reshape(-1, 1), y)
    a, b = float(lr.coef_[0][0]), float(lr.intercept_[0])
    if a < 0:
        a, b = 0.0, logit(n_fake / len(y))
    return Calibrator(
        signal=signal,
        model=model,
        method="platt",
        transform=transform,
        a=a,
        b=b,
        n=len(y),
        n_fake=n_fake,
    )


def load(path: Path) -> Calibration:
    """Read a calibration file. Raises InvalidInput naming the path when it is unusable."""
    try:
        cal = msgspec.json.decode(path.read_bytes(), type=Calibration)
    except OSError as exc:
        raise InvalidInput(f"calibration {path}: {exc.strerror or exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"calibration {path}: not a calibration file: {exc}") from None
    if cal.version != CALIBRATION_VERSION:
        raise InvalidInput(
            f"calibration {path}: version {cal.version!r}, this synthwatch reads "
            f"{CALIBRATION_VERSION!r}"
        )
    return cal


def save(cal: Calibration, path: Path) -> None:
    """Write atomically (temporary file, then rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(cal), indent=2) + b"\n")
    tmp.replace(path)


def new(
    calibrators: Sequence[Calibrator], fitted_on: Sequence[str], *, prior: float = 0.5
) -> Calibration:
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be strictly between 0 and 1, got {prior}")
    return Calibration(
        created_at=round(time.time(), 3),
        fitted_on=list(fitted_on),
        calibrators=sorted(calibrators, key=lambda c: c.signal),
        prior=prior,
    )
