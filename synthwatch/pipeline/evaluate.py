"""`synthwatch eval` and `synthwatch calibrate`: score labelled media, measure, fit.

Both read a CSV with columns `path,label` (label `real` or `fake`; paths relative to the
CSV), scan every item once through the same engine `scan` uses, and keep each item's
uncalibrated signals. From those:

- `evaluate` reports, per media type and overall, n, ROC AUC, equal error rate, and
  precision / recall / false-positive rate at the policy thresholds, for the
  calibration in use;
- `cross_validate` refits the calibration on k-1 folds and scores the held-out fold,
  so numbers reported on the items the shipped calibration was fitted on are not
  fitted to them (stratified folds, fixed seed);
- `fit_calibration` fits one calibrator per signal on all items;
- `signal_table` gives each signal's own AUC, also over only the items its model was
  not trained on: a model trained by `synthwatch train` lists the sha256 of every file
  it learned from in the report beside its weights (`training_splits`), so a labelled
  set that shares files with its training data is reported as such.

A verdict's score is recomputed from its signals (`fuse.calibrate` + `fuse.combine` +
the policy), which is exactly what the engine does, so refitting needs no rescan.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthwatch.digest import file_sha256
from synthwatch.errors import ModelUnavailable
from synthwatch.operators import calibrate as cal
from synthwatch.operators import fuse
from synthwatch.operators.calibrate import Calibration, Calibrator, Method
from synthwatch.operators.policy import Policy
from synthwatch.schemas import Decision, Signal, Verdict
from synthwatch.train.labels import LABELS, Labelled, group_of


@dataclass(frozen=True)
class Scored:
    item: Labelled
    verdict: Verdict | None
    """None when the item could not be scanned (`error` says why)."""
    error: str = ""


def normalise_geometry(src: Path, dest: Path, size: int) -> Path:
    """`dest`: `src` as a centre square crop resized to `size` x `size` (Lanczos, which
    antialiases when shrinking) and saved losslessly as PNG, when `src` is a still;
    `src` itself otherwise (video, audio, animations, what Pillow cannot open).

    For labelled sets whose classes differ in size: ml72's AI images are all 559x559
    and its camera photos larger (../shared/DATA.md), so a detector can separate them
    by size, aspect or sampling traces alone. A side well below the smallest image's
    (256 for ml72: every image shrinks 2.2x or more) leaves every item the same shape
    and every pixel a weighted mean of many. Metadata does not survive (PNG re-save),
    so provenance signals are not measured on such a run."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(src) as image:
            if getattr(image, "n_frames", 1) > 1:
                return src
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError):
        return src
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    square.resize((size, size), Image.Resampling.LANCZOS).save(dest, format="PNG")
    return dest


def file_id(path: Path) -> str:
    return f"{path.name} (sha256 {file_sha256(path)[:16]})"


# --- training overlap --------------------------------------------------------------------


def training_sources(store: Any, models: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """model name -> the sources its training report lists (each with `sha256`, `split`
    and, for `synthwatch train scene`, the item's out-of-fold score `oof_score`).

    Read from the report `synthwatch train` writes beside the model's own weights file
    (`<name>.json`), and only when that report names the very weights in use. Models
    without such a report (third-party weights) are left out: what they were trained on
    is unknown here."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(set(models)):
        try:
            spec = store.spec(name)
            paths = store.resolve(name)
        except ModelUnavailable:
            continue
        own = [(f, p) for f, p in zip(spec.files, paths, strict=True) if f.bundled and not f.wheel]
        if not own:
            continue
        f, weights = own[-1]
        try:
            data = json.loads(weights.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("weights_sha256") != f.sha256:
            continue
        sources = data.get("data", {}).get("sources", [])
        out[name] = [s for s in sources if isinstance(s, dict) and "sha256" in s]
    return out


def training_splits(store: Any, models: Iterable[str]) -> dict[str, dict[str, str]]:
    """model name -> {sha256 of a file its training run read: "train" | "val" | ...}."""
    return {
        name: {str(s["sha256"]): str(s.get("split", "train")) for s in sources}
        for name, sources in training_sources(store, models).items()
    }


def out_of_fold(store: Any, models: Iterable[str]) -> dict[str, dict[str, float]]:
    """model name -> {sha256: the score a fold's model that never saw the file gave it},
    for models trained with cross-validation (`synthwatch train scene`)."""
    return {
        name: {str(s["sha256"]): float(s["oof_score"]) for s in sources if "oof_score" in s}
        for name, sources in training_sources(store, models).items()
        if any("oof_score" in s for s in sources)
    }


def with_out_of_fold(scored: Sequence[Scored], oof: dict[str, dict[str, float]]) -> list[Scored]:
    """The items with each signal of a model in `oof` replaced by its out-of-fold score
    where the model was trained on the item: what cross-validation must score, since
    the shipped model saw the item. Matched on the file's sha256."""
    if not oof:
        return list(scored)
    from msgspec.structs import replace

    out = []
    for s in scored:
        if s.verdict is None or not s.item.path.is_file():
            out.append(s)
            continue
        digest = _item_sha256(s.item.path)
        signals = [
            replace(sig, score=oof[sig.name][digest], raw_score=oof[sig.name][digest])
            if digest in oof.get(sig.name, {})
            else sig
            for sig in s.verdict.signals
        ]
        out.append(Scored(s.item, replace(s.verdict, signals=signals), s.error))
    return out


def seen_in_training(
    scored: Sequence[Scored], splits: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """item path (as in the CSV) -> {model: the split its training run put the file in},
    for the items some model's training run read."""
    seen: dict[str, dict[str, str]] = {}
    for s in scored:
        if not splits or not s.item.path.is_file():
            continue
        digest = _item_sha256(s.item.path)
        hits = {model: by_sha[digest] for model, by_sha in splits.items() if digest in by_sha}
        if hits:
            seen[s.item.rel] = hits
    return seen


@functools.cache
def _item_sha256(path: Path) -> str:
    """The hash training reports hold for a file; eval asks twice per item (training
    overlap, out-of-fold scores), so each labelled file is read once."""
    return file_sha256(path)


def signal_table(report_: dict[str, Any]) -> list[dict[str, Any]]:
    """Each signal alone: the AUC of its raw score over the items that have it, and over
    those of them its model was not trained on (items in its validation split count as
    not trained on; the report's items carry `trained_on` from `seen_in_training`)."""
    ok = [r for r in report_["items"] if "error" not in r]
    names = sorted({name for r in ok for name in r.get("signals", {})})
    rows = []
    for name in names:
        have = [r for r in ok if r["signals"].get(name) is not None]
        unseen = [r for r in have if r.get("trained_on", {}).get(name) != "train"]
        row: dict[str, Any] = {"signal": name}
        for key, part in (("all", have), ("not_trained_on", unseen)):
            labels = [LABELS[r["label"]] for r in part]
            auc, _ = auc_eer(labels, [float(r["signals"][name]) for r in part])
            row[key] = {
                "n": len(part),
                "n_fake": int(sum(labels)),
                "auc": None if auc is None else round(auc, 4),
            }
        rows.append(row)
    return rows


# --- rescoring ---------------------------------------------------------------------------


def rescore(
    verdict: Verdict, calibration: Calibration, policy: Policy
) -> tuple[float | None, Decision]:
    """(synthetic score, decision) of a verdict's signals under another calibration; the
    score is None for an item no detector scored."""
    fused = fuse.combine(fuse.calibrate(verdict.signals, calibration), prior=calibration.prior)
    return fused.score, policy.decide(fused.score, minimum=fused.minimum)


def calibratable(signals: Iterable[Signal]) -> Iterable[Signal]:
    return (s for s in signals if not s.decides and s.modality not in ("provenance", "metadata"))


def fit_calibration(
    scored: Sequence[Scored],
    *,
    method: Method = "platt",
    fitted_on: Sequence[str] = (),
    warn: Callable[[str], None] = lambda _m: None,
) -> Calibration:
    """One calibrator per (signal, model version) seen on the scanned items."""
    data: dict[tuple[str, str], tuple[list[float], list[int]]] = {}
    for s in scored:
        if s.verdict is None:
            continue
        for sig in calibratable(s.verdict.signals):
            if sig.modality == "audio" and s.verdict.media_type != "audio":
                # A video's label says whether the item is fake, not which track: a face
                # swap usually keeps its real voice. Audio models learn their scale from
                # audio-only items, whose label is the voice's.
                continue
            raw = sig.score if sig.raw_score is None else sig.raw_score
            xs, ys = data.setdefault((sig.name, sig.model), ([], []))
            xs.append(raw)
            ys.append(s.item.label)
    calibrators: list[Calibrator] = []
    for (name, model), (xs, ys) in sorted(data.items()):
        try:
            calibrators.append(
                cal.fit(
                    name,
                    model,
                    xs,
                    ys,
                    method=method,
                    transform="identity" if name in fuse.NOT_PROBABILITIES else "logit",
                )
            )
        except ValueError as exc:
            warn(f"not calibrated: {exc}")
    labels = [s.item.label for s in scored if s.verdict is not None]
    prior = sum(labels) / len(labels) if labels and 0 < sum(labels) < len(labels) else 0.5
    return cal.new(calibrators, fitted_on, prior=prior)


# --- metrics -------------------------------------------------------------------------------


def auc_eer(labels: Sequence[int], scores: Sequence[float]) -> tuple[float | None, float | None]:
    """(ROC AUC, equal error rate); None when one class is missing."""
    if len(set(labels)) < 2:
        return None, None
    from sklearn.metrics import roc_auc_score, roc_curve

    auc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    # interpolate between the two points around the crossing
    if i + 1 < len(fpr) and (fnr[i] - fpr[i]) * (fnr[i + 1] - fpr[i + 1]) < 0:
        d0, d1 = fnr[i] - fpr[i], fnr[i + 1] - fpr[i + 1]
        w = d0 / (d0 - d1)
        eer = float(fpr[i] + w * (fpr[i + 1] - fpr[i]))
    else:
        eer = float((fpr[i] + fnr[i]) / 2)
    return auc, eer


def at_threshold(labels: Sequence[int], scores: Sequence[float], t: float) -> dict[str, Any]:
    y = np.asarray(labels)
    pred = np.asarray(scores) >= t
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    tn = int((~pred & (y == 0)).sum())
    return {
        "threshold": t,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "fpr": _ratio(fp, fp + tn),
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def summary(
    labels: Sequence[int], scores: Sequence[float | None], policy: Policy
) -> dict[str, Any]:
    """AUC, EER and the thresholds' precision, recall and FPR over the items that have a
    score; the items without one (`inconclusive`) are counted beside them, never as a
    pass: a detector that cannot score an item has not shown it real."""
    scored = [(y, v) for y, v in zip(labels, scores, strict=True) if v is not None]
    ys = [y for y, _ in scored]
    vs = [v for _, v in scored]
    auc, eer = auc_eer(ys, vs)
    inconclusive = [y for y, v in zip(labels, scores, strict=True) if v is None]
    return {
        "n": len(labels),
        "n_fake": int(sum(labels)),
        "n_real": len(labels) - int(sum(labels)),
        "n_inconclusive": len(inconclusive),
        "n_inconclusive_fake": int(sum(inconclusive)),
        "inconclusive_rate": _ratio(len(inconclusive), len(labels)),
        "auc": None if auc is None else round(auc, 4),
        "eer": None if eer is None else round(eer, 4),
        "at_review": at_threshold(ys, vs, policy.review_threshold),
        "at_flag": at_threshold(ys, vs, policy.flag_threshold),
    }


def report(
    scored: Sequence[Scored],
    calibration: Calibration,
    policy: Policy,
    *,
    scores_override: dict[str, tuple[float | None, Decision]] | None = None,
    seen: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The `{"overall", "by_type", "items"}` report (items that failed to scan are
    listed with their error and left out of the metrics); `seen` (`seen_in_training`)
    adds `trained_on` to the items a model was trained or validated on."""
    rows: list[dict[str, Any]] = []
    for s in scored:
        if s.verdict is None:
            rows.append({"path": s.item.rel, "label": _name(s.item.label), "error": s.error})
            continue
        score, decision = rescore(s.verdict, calibration, policy)
        if scores_override is not None:
            score, decision = scores_override[s.item.rel]
        rows.append(
            {
                "path": s.item.rel,
                "label": _name(s.item.label),
                "group": s.item.group or group_of(s.item.rel),
                "media_type": s.verdict.media_type,
                "synthetic_score": None if score is None else round(score, 6),
                "decision": decision,
                "signals": {
                    sig.name: sig.raw_score if sig.raw_score is not None else sig.score
                    for sig in s.verdict.signals
                },
            }
        )
        if seen and s.item.rel in seen:
            rows[-1]["trained_on"] = seen[s.item.rel]
    ok = [r for r in rows if "error" not in r]
    by_type: dict[str, Any] = {}
    for mt in sorted({r["media_type"] for r in ok}):
        sub = [r for r in ok if r["media_type"] == mt]
        by_type[mt] = summary(
            [LABELS[r["label"]] for r in sub], [r["synthetic_score"] for r in sub], policy
        )
    return {
        "overall": summary(
            [LABELS[r["label"]] for r in ok], [r["synthetic_score"] for r in ok], policy
        ),
        "by_type": by_type,
        "by_group": by_group(ok, policy),
        "errors": len(rows) - len(ok),
        "items": rows,
    }


def by_group(rows: Sequence[dict[str, Any]], policy: Policy) -> dict[str, Any]:
    """Per source or generator family: a group of fakes is ranked against every real
    item (its AUC says how well that generator is told from real media), a group of
    reals reports its false-positive rates, a mixed group its own AUC."""
    reals = [r for r in rows if r["label"] == "real"]
    out: dict[str, Any] = {}
    for group in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == group]
        fakes = [r for r in members if r["label"] == "fake"]
        pool = members if len(fakes) < len(members) else [*fakes, *reals]
        m = summary(
            [LABELS[r["label"]] for r in pool], [r["synthetic_score"] for r in pool], policy
        )
        m["n"], m["n_fake"] = len(members), len(fakes)
        m["n_real"] = len(members) - len(fakes)
        m["against"] = (
            "own reals" if 0 < len(fakes) < len(members) else ("all reals" if fakes else "-")
        )
        inconclusive = [r for r in members if r["synthetic_score"] is None]
        m["n_inconclusive"] = len(inconclusive)
        m["inconclusive_rate"] = _ratio(len(inconclusive), len(members))
        out[group] = m
    return out


def _name(label: int) -> str:
    return "fake" if label else "real"


def cross_validate(
    scored: Sequence[Scored],
    policy: Policy,
    *,
    folds: int = 5,
    seed: int = 0,
    method: Method = "platt",
) -> dict[str, tuple[float | None, Decision]]:
    """Held-out (score, decision) per item (by CSV path): calibration refitted without
    its fold.

    Folds are stratified by label and assigned from a seeded permutation. A fold whose
    training part cannot fit a signal leaves that signal uncalibrated for the fold.
    """
    ok = [s for s in scored if s.verdict is not None]
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for label in (0, 1):
        members = [s for s in ok if s.item.label == label]
        order = rng.permutation(len(members))
        for rank, idx in enumerate(order):
            fold_of[members[idx].item.rel] = rank % folds
    out: dict[str, tuple[float | None, Decision]] = {}
    for k in range(folds):
        train = [s for s in ok if fold_of[s.item.rel] != k]
        test = [s for s in ok if fold_of[s.item.rel] == k]
        if not test:
            continue
        fitted = fit_calibration(train, method=method)
        for s in test:
            assert s.verdict is not None
            out[s.item.rel] = rescore(s.verdict, fitted, policy)
    return out


def plot_roc(report_: dict[str, Any], dest: Path, title: str) -> None:
    """ROC curve per media type and overall, as an image (PNG/SVG/PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    ok = [r for r in report_["items"] if "error" not in r and r["synthetic_score"] is not None]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    groups = [("overall", ok)] + [
        (mt, [r for r in ok if r["media_type"] == mt]) for mt in report_["by_type"]
    ]
    for name, rows in groups:
        labels = [LABELS[r["label"]] for r in rows]
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, [r["synthetic_score"] for r in rows])
        auc = report_["overall"]["auc"] if name == "overall" else report_["by_type"][name]["auc"]
        ax.plot(fpr, tpr, label=f"{name} (n={len(rows)}, AUC={auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest)
    plt.close(fig)


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def markdown(report_: dict[str, Any]) -> str:
    """The report's tables as Markdown, for docs/EVALUATION.md."""

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    def inconclusive(m: dict[str, Any]) -> str:
        rate = m.get("inconclusive_rate")
        return f"{m.get('n_inconclusive', 0)} ({rate:.0%})" if rate else "0"

    def groups(part: dict[str, Any]) -> list[str]:
        lines = [
            "| group | n | fake | inconclusive | AUC | recall at review | FPR at review |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in part.items():
            t = m["at_review"]
            recall = fmt(t["recall"]) if m["n_fake"] else "-"
            fpr = fmt(t["fpr"]) if m["n_real"] else "-"
            lines.append(
                f"| `{name}` | {m['n']} | {m['n_fake']} | {inconclusive(m)} | "
                f"{fmt(m['auc']) if m['n_fake'] else '-'} | {recall} | {fpr} |"
            )
        return lines

    def table(part: dict[str, Any]) -> list[str]:
        lines = [
            "| type | n | fake | inconclusive | AUC | EER | threshold | precision | recall | FPR |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in [*part["by_type"].items(), ("**overall**", part["overall"])]:
            for key in ("at_review", "at_flag"):
                t = m[key]
                first = key == "at_review"
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            name if first else "",
                            str(m["n"]) if first else "",
                            str(m["n_fake"]) if first else "",
                            inconclusive(m) if first else "",
                            fmt(m["auc"]) if first else "",
                            fmt(m["eer"]) if first else "",
                            fmt(t["threshold"]),
                            fmt(t["precision"]),
                            fmt(t["recall"]),
                            fmt(t["fpr"]),
                        ]
                    )
                    + " |"
                )
        return lines

    out = ["As configured (shipped calibration):", "", *table(report_), ""]
    if report_.get("signals"):
        out += [
            "Each signal alone (raw scores, AUC over the items that have the signal; "
            "no fitting). The last columns leave out the items its model was trained on:",
            "",
            "| signal | items | fake | AUC | not trained on: items | fake | AUC |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report_["signals"]:
            a, u = row["all"], row["not_trained_on"]
            out.append(
                f"| `{row['signal']}` | {a['n']} | {a['n_fake']} | {fmt(a['auc'])} "
                f"| {u['n']} | {u['n_fake']} | {fmt(u['auc'])} |"
            )
        out.append("")
    if "cross_validated" in report_:
        cv = report_["cross_validated"]
        out += [
            f"Calibration refitted per fold ({cv['folds']}-fold cross-validation):",
            "",
            *table(cv),
            "",
        ]
        if cv.get("by_group"):
            out += [
                "By source or generator family, cross-validated (a group of fakes is "
                "ranked against every real item; FPR is that of a group's reals):",
                "",
                *groups(cv["by_group"]),
                "",
            ]
    return "\n".join(out)
