"""Train `scene_probe`: a logistic unit on frozen ImageNet MobileNetV2 features.

    synthwatch train scene --labels ../shared/media/ml72/labels.csv --out out/ --seed 0

Labelled stills (CSV `path,label[,group]`, as `synthwatch eval` reads) are brought to one
geometry (`inputs.scene_view`: centre square, Lanczos to 224), embedded once by the
frozen backbone (`SceneFeatures`), and a standardised, L2-regularised logistic
regression is fitted on the embeddings. The regularisation strength C is chosen by
cross-validation inside the training data only, from a fixed grid.

What is reported is cross-validated: stratified k-fold (by group and label, seeded), C
chosen again inside each training part, and every item scored by a model fitted without
it (its `oof_score` in the report). `synthwatch eval` puts those out-of-fold scores in
place of the shipped model's when it cross-validates a set the probe was trained on, so
no number it reports scores an image with a model that saw it.

Deterministic for a seed: the backbone is frozen and in eval mode, the embeddings are
computed in a fixed order, and scikit-learn's lbfgs solver is deterministic.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageOps

from synthwatch.digest import file_sha256
from synthwatch.errors import InvalidInput
from synthwatch.models.inputs import scene_view as _view
from synthwatch.models.mobilenet import SCENE_FEATURES, MobileNetV2, SceneFeatures, SceneProbe
from synthwatch.train.labels import Labelled, read_labels
from synthwatch.train.loop import TrainReport

C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 11))
"""Inverse L2 strengths tried, 1e-3 to 1e2 in half decades."""
INNER_FOLDS = 5
MIN_SIDE = 512
"""The probe abstains on stills whose shortest side is below this: ml72, its training
set, has none smaller than 559 px, and at a few hundred pixels compression and scale
dominate what the features see (docs/models/scene_probe.md)."""


@dataclass(frozen=True)
class _Item:
    labelled: Labelled
    sha256: str


def train_scene(
    label_files: Sequence[Path],
    out: Path,
    *,
    backbone: Path,
    seed: int = 0,
    folds: int = 5,
) -> TrainReport:
    """Fit the probe on every labelled still; write `scene_probe.pt` and its report.

    Raises InvalidInput when the labels name no usable still of each class.
    """
    start = time.monotonic()
    items, skipped = _stills(label_files)
    labels = np.array([i.labelled.label for i in items])
    if len(set(labels.tolist())) < 2 or min(np.bincount(labels)) < folds:
        raise InvalidInput(f"need at least {folds} stills of each class, got {np.bincount(labels)}")
    module = _module(backbone)
    x = embed(module.features, [i.labelled.path for i in items])
    groups = [i.labelled.group for i in items]
    oof = np.zeros(len(items))
    for train, test in _folds(labels, groups, folds, seed):
        c = choose_c(x[train], labels[train], seed)
        oof[test] = _fit(x[train], labels[train], c).predict_proba(x[test])[:, 1]
    c_final = choose_c(x, labels, seed)
    final = _fit(x, labels, c_final)
    scaler, logistic = final.named_steps["standardscaler"], final.named_steps["logisticregression"]
    with torch.no_grad():
        module.shift.copy_(torch.from_numpy(scaler.mean_.astype(np.float32)))
        module.scale.copy_(torch.from_numpy(scaler.scale_.astype(np.float32)))
        module.head.weight.copy_(torch.from_numpy(logistic.coef_.astype(np.float32)))
        module.head.bias.copy_(torch.from_numpy(logistic.intercept_.astype(np.float32)))
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "scene_probe.pt"
    torch.save({k: v.detach().clone() for k, v in module.head_state().items()}, weights)
    weights_sha = file_sha256(weights)
    metrics = cv_metrics(labels.tolist(), oof.tolist(), groups)
    details: dict[str, Any] = {
        "name": "scene_probe",
        "weights": weights.name,
        "weights_sha256": weights_sha,
        "backbone_sha256": file_sha256(backbone),
        "seed": seed,
        "recipe": {
            "view": "centre square, Lanczos resize to 224x224, RGB in [0, 1], ImageNet mean/std",
            "features": "mean activation of MobileNetV2 blocks 3, 6, 10, 13, 16, 17 (696)",
            "head": "standardise, L2 logistic regression (lbfgs)",
            "c_grid": list(C_GRID),
            "c": c_final,
            "folds": folds,
            "inner_folds": INNER_FOLDS,
            "min_side": MIN_SIDE,
        },
        "cross_validated": metrics,
        "data": {
            "labels": [f"{p.name} (sha256 {file_sha256(p)[:16]})" for p in label_files],
            "sources": [
                {
                    "path": i.labelled.rel,
                    "sha256": i.sha256,
                    "label": "fake" if i.labelled.label else "real",
                    "group": i.labelled.group,
                    "split": "train",
                    "oof_score": round(float(s), 6),
                }
                for i, s in zip(items, oof, strict=True)
            ],
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        },
    }
    wall = time.monotonic() - start
    details["wall_time_s"] = round(wall, 1)
    report = out / "scene_probe.json"
    report.write_text(json.dumps(details, indent=2, sort_keys=True) + "\n")
    return TrainReport(
        name="scene_probe",
        weights=weights,
        report=report,
        weights_sha256=weights_sha,
        val_auc=float(metrics["overall"]["auc"]),
        wall_time_s=wall,
        device="cpu",
        details=details,
    )


def _stills(label_files: Sequence[Path]) -> tuple[list[_Item], list[tuple[str, str]]]:
    items: list[_Item] = []
    skipped: list[tuple[str, str]] = []
    for f in label_files:
        for labelled in read_labels(f):
            try:
                with Image.open(labelled.path) as image:
                    if getattr(image, "n_frames", 1) > 1:
                        skipped.append((labelled.rel, "animation"))
                        continue
                    if min(image.size) < MIN_SIDE:
                        skipped.append((labelled.rel, f"shorter side under {MIN_SIDE} px"))
                        continue
            except OSError:
                skipped.append((labelled.rel, "not a still Pillow opens"))
                continue
            items.append(_Item(labelled, file_sha256(labelled.path)))
    return items, skipped


def _module(backbone: Path) -> SceneProbe:
    net = MobileNetV2()
    net.load_state_dict(torch.load(backbone, map_location="cpu", weights_only=True), strict=True)
    return SceneProbe(net).eval()


@torch.no_grad()
def embed(features: SceneFeatures, paths: Sequence[Path], batch: int = 8) -> npt.NDArray[Any]:
    """(N, 696) float64 embeddings of the stills at `paths`, in order."""
    out = np.zeros((len(paths), SCENE_FEATURES))
    for start in range(0, len(paths), batch):
        views = []
        for path in paths[start : start + batch]:
            with Image.open(path) as image:
                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            views.append(_view(rgb))
        x = np.stack(views).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        out[start : start + len(views)] = features(torch.from_numpy(x)).double().numpy()
    return out


def _folds(
    labels: npt.NDArray[Any], groups: Sequence[str], folds: int, seed: int
) -> list[tuple[npt.NDArray[Any], npt.NDArray[Any]]]:
    """Stratified by group and label, so every fold holds each generator family."""
    from sklearn.model_selection import StratifiedKFold

    strata = [f"{g}|{y}" for g, y in zip(groups, labels.tolist(), strict=True)]
    counts = {s: strata.count(s) for s in strata}
    # A stratum smaller than the fold count falls back to its label alone.
    strata = [s if counts[s] >= folds else s.split("|")[1] for s in strata]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), strata))


def _fit(x: npt.NDArray[Any], y: npt.NDArray[Any], c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)


def choose_c(x: npt.NDArray[Any], y: npt.NDArray[Any], seed: int) -> float:
    """The grid's C with the best inner cross-validated AUC (the smaller C on a tie)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    # As many inner folds as the smaller class allows, up to INNER_FOLDS.
    inner = max(2, min(INNER_FOLDS, int(np.bincount(y.astype(int)).min())))
    splitter = StratifiedKFold(n_splits=inner, shuffle=True, random_state=seed + 1)
    best, best_auc = C_GRID[0], -math.inf
    for c in C_GRID:
        scores = np.zeros(len(y))
        for train, test in splitter.split(x, y):
            scores[test] = _fit(x[train], y[train], c).predict_proba(x[test])[:, 1]
        auc = float(roc_auc_score(y, scores))
        if auc > best_auc + 1e-9:
            best, best_auc = c, auc
    return best


def cv_metrics(labels: Sequence[int], scores: Sequence[float], groups: Sequence[str]) -> Any:
    """Out-of-fold AUC overall and per group (fakes against every real), FPR per group of
    reals and overall at 0.5."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    s = np.asarray(scores)
    g = np.asarray(groups)
    reals = y == 0
    out: dict[str, Any] = {
        "overall": {
            "n": len(y),
            "n_fake": int(y.sum()),
            "auc": round(float(roc_auc_score(y, s)), 4),
            "fpr_at_0.5": round(float((s[reals] >= 0.5).mean()), 4),
            "recall_at_0.5": round(float((s[~reals] >= 0.5).mean()), 4),
        },
        "by_group": {},
    }
    for group in sorted(set(groups)):
        member = g == group
        if y[member].all():
            pool = member | reals
            auc = round(float(roc_auc_score(y[pool], s[pool])), 4)
            out["by_group"][group] = {"n": int(member.sum()), "auc_vs_all_reals": auc}
        else:
            fpr = round(float((s[member & reals] >= 0.5).mean()), 4)
            out["by_group"][group] = {"n": int(member.sum()), "fpr_at_0.5": fpr}
    return out
