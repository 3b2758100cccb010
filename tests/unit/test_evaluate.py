"""`synthwatch eval` arithmetic: labels files, AUC/EER, thresholds, cross-validation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from synthwatch.digest import file_sha256
from synthwatch.errors import InvalidInput, ModelUnavailable
from synthwatch.operators import calibrate as cal
from synthwatch.operators.policy import Policy
from synthwatch.pipeline import evaluate as ev
from synthwatch.schemas import Signal, Verdict
from synthwatch.train.labels import Labelled, group_of, read_labels

POLICY = Policy(version="p", flag_threshold=0.8, review_threshold=0.5)


def verdict(score: float, media_type: str = "image") -> Verdict:
    return Verdict(
        id="x",
        url="file:///x",
        sha256="ab" * 32,
        media_type=media_type,  # type: ignore[arg-type]
        synthetic_score=score,
        decision="pass",
        signals=[Signal(name="m", model="m@abc", score=score, weight=1.0, modality="image")],
        segments=[],
        frames=[],
        duration_s=0.0,
        faces_found=0,
        has_audio=False,
        model_set="s",
        policy_version="p",
        blob="b",
    )


def scored(scores: list[float], labels: list[int], media_type: str = "image") -> list[ev.Scored]:
    return [
        ev.Scored(
            item=Labelled(path=Path(f"/x/{i}"), rel=f"{i}.jpg", label=y),
            verdict=verdict(s, media_type),
        )
        for i, (s, y) in enumerate(zip(scores, labels, strict=True))
    ]


def test_labels_file_problems_are_listed_together(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.jpg,fake\nmissing.jpg,real\na.jpg,maybe\n,real\n")
    with pytest.raises(InvalidInput) as info:
        read_labels(csv)
    msg = str(info.value)
    assert "missing.jpg: no such file" in msg and "'maybe'" in msg and "empty path" in msg
    csv.write_text("file,truth\na.jpg,fake\n")
    with pytest.raises(InvalidInput, match="path,label"):
        read_labels(csv)
    csv.write_text("path,label\na.jpg,FAKE\n")
    [item] = read_labels(csv)
    assert item.label == 1 and item.path == (tmp_path / "a.jpg").resolve()


def test_auc_and_eer_of_known_rankings() -> None:
    assert ev.auc_eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 0.0)
    auc, eer = ev.auc_eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])
    assert auc == 0.0 and eer == pytest.approx(1.0)
    auc, eer = ev.auc_eer([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])
    assert auc == pytest.approx(0.75) and eer == pytest.approx(0.5)
    assert ev.auc_eer([1, 1], [0.3, 0.4]) == (None, None)


def test_threshold_counts() -> None:
    m = ev.at_threshold([0, 0, 0, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.3], 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 2)
    assert (
        m["precision"] == 0.5 and m["recall"] == 0.5 and m["fpr"] == pytest.approx(1 / 3, abs=1e-3)
    )


def test_report_by_type_and_items() -> None:
    items = scored([0.1, 0.9], [0, 1]) + scored([0.2, 0.7], [0, 1], "audio")
    items.append(ev.Scored(item=Labelled(Path("/x/z"), "z.mp4", 1), verdict=None, error="corrupt"))
    rep = ev.report(items, cal.EMPTY, POLICY)
    assert rep["overall"]["n"] == 4 and rep["errors"] == 1
    assert set(rep["by_type"]) == {"image", "audio"}
    assert rep["by_type"]["audio"]["at_review"]["recall"] == 1.0
    assert {r["path"] for r in rep["items"]} == {"0.jpg", "1.jpg", "z.mp4"}
    assert rep["items"][0]["decision"] == "pass" and rep["items"][1]["decision"] == "flag"


def test_inconclusive_items_are_counted_beside_the_auc_never_as_a_pass() -> None:
    items = scored([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    unscored = verdict(0.0)
    unscored = Verdict(
        **{**{f: getattr(unscored, f) for f in unscored.__struct_fields__}, "signals": []}
    )
    # A fake nothing could score: as a pass (score 0) it would drag the AUC to 0.75.
    items.append(ev.Scored(item=Labelled(Path("/x/g"), "g.gif", 1), verdict=unscored))
    rep = ev.report(items, cal.EMPTY, POLICY)
    overall = rep["overall"]
    assert overall["n"] == 5 and overall["n_inconclusive"] == 1
    assert overall["n_inconclusive_fake"] == 1 and overall["inconclusive_rate"] == 0.2
    assert overall["auc"] == 1.0
    assert overall["at_review"]["fn"] == 0  # not counted as a missed (passed) fake either
    row = next(r for r in rep["items"] if r["path"] == "g.gif")
    assert row["synthetic_score"] is None and row["decision"] == "inconclusive"
    held = ev.cross_validate(items, POLICY, folds=2)
    assert held["g.gif"] == (None, "inconclusive")
    assert "| 1 (20%) |" in ev.markdown(rep)


def test_cross_validation_scores_every_item_with_a_calibration_fitted_without_it() -> None:
    rng = np.random.default_rng(1)
    labels = [0] * 20 + [1] * 20
    scores = [
        float(v) for v in np.concatenate([rng.uniform(0.6, 0.8, 20), rng.uniform(0.75, 0.95, 20)])
    ]
    items = scored(scores, labels)
    held = {rel: score for rel, (score, _) in ev.cross_validate(items, POLICY, folds=4).items()}
    assert set(held) == {i.item.rel for i in items}
    full = ev.fit_calibration(items)
    in_sample = {i.item.rel: ev.rescore(i.verdict, full, POLICY)[0] for i in items if i.verdict}
    assert held != in_sample  # each fold's calibrator differs from the one fitted on all
    auc = ev.auc_eer(labels, [float(held[i.item.rel] or 0.0) for i in items])[0]
    assert auc is not None and auc > 0.8


def test_audio_models_are_calibrated_on_audio_items_only() -> None:
    def with_voice(score: float, media_type: str) -> Verdict:
        v = verdict(0.5, media_type)
        voice = Signal(name="voice", model="voice@1", score=score, weight=1.0, modality="audio")
        return Verdict(**{**{f: getattr(v, f) for f in v.__struct_fields__}, "signals": [voice]})

    # Fake videos whose voice is real (a face swap keeps it) must not teach the audio
    # model that real voices are fake.
    items = [
        ev.Scored(Labelled(Path(f"/a/{i}"), f"a{i}", y), with_voice(s, "audio"))
        for i, (s, y) in enumerate([(0.1, 0), (0.2, 0), (0.8, 1), (0.9, 1)])
    ] + [
        ev.Scored(Labelled(Path(f"/v/{i}"), f"v{i}", 1), with_voice(0.05, "video"))
        for i in range(10)
    ]
    c = ev.fit_calibration(items).get("voice", "voice@1")
    assert c is not None and c.n == 4 and c.apply(0.9) > c.apply(0.1)


class _Store:
    """The two ModelStore calls training_splits makes, over one weights file."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights

    def spec(self, name: str) -> Any:
        if name != "m":
            raise ModelUnavailable(f"unknown model {name!r}")
        files = [SimpleNamespace(sha256=file_sha256(self.weights), bundled=True, wheel=None)]
        return SimpleNamespace(files=files)

    def resolve(self, name: str) -> tuple[Path, ...]:
        self.spec(name)
        return (self.weights,)


def test_items_a_model_was_trained_on_are_marked_and_left_out_of_its_unseen_auc(
    tmp_path: Path,
) -> None:
    files = {}
    for name in ("a", "b", "c", "d"):
        files[name] = tmp_path / f"{name}.jpg"
        files[name].write_bytes(name.encode() * 100)
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"weights")
    sources = [
        {"sha256": file_sha256(files["a"]), "split": "train"},
        {"sha256": file_sha256(files["b"]), "split": "val"},
    ]
    report_file = weights.with_suffix(".json")
    report_file.write_text(
        json.dumps({"weights_sha256": file_sha256(weights), "data": {"sources": sources}})
    )
    # a: a real item the model was trained on, and remembers; b: validation only.
    labels = {"a": 0, "b": 0, "c": 1, "d": 1}
    scores = {"a": 0.05, "b": 0.9, "c": 0.8, "d": 0.7}
    items = [
        ev.Scored(
            item=Labelled(path=files[n], rel=f"{n}.jpg", label=labels[n]),
            verdict=verdict(scores[n]),  # one signal, m, of model m
        )
        for n in files
    ]
    splits = ev.training_splits(_Store(weights), ["m", "spectral_grid"])
    seen = ev.seen_in_training(items, splits)
    assert seen == {"a.jpg": {"m": "train"}, "b.jpg": {"m": "val"}}

    rep = ev.report(items, cal.EMPTY, POLICY, seen=seen)
    assert rep["items"][0]["trained_on"] == {"m": "train"}
    assert "trained_on" not in rep["items"][2]
    [row] = ev.signal_table(rep)
    assert row["all"] == {"n": 4, "n_fake": 2, "auc": 0.5}
    # Without the item it was trained on, the real left scores above both fakes.
    assert row["not_trained_on"] == {"n": 3, "n_fake": 2, "auc": 0.0}
    assert "not trained on" in ev.markdown({**rep, "signals": [row]})

    # A report that names other weights says nothing about these.
    report_file.write_text(json.dumps({"weights_sha256": "0" * 64, "data": {"sources": sources}}))
    assert ev.training_splits(_Store(weights), ["m"]) == {}


@pytest.mark.parametrize(
    ("rel", "group"),
    [
        ("ai/diffusion3_7.jpg", "ai/diffusion3"),
        ("real/animals_10.jpg", "real/animals"),
        ("fake/df00204.jpg", "fake/df"),
        ("real/liveportrait_d11.mp4", "real/liveportrait"),
        ("images/fake/declan_A1.jpg", "images/fake/declan"),
        ("clip.mp4", "clip"),
    ],
)
def test_items_are_grouped_by_source_from_their_names(rel: str, group: str) -> None:
    assert group_of(rel) == group


def test_a_group_column_names_the_source_and_groups_are_reported(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(b"x")
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "path,label,group\na.jpg,fake,gen-x\nb.jpg,fake,gen-y\nc.jpg,real,\nd.jpg,real,cam\n"
    )
    items = read_labels(csv)
    assert [i.group for i in items] == ["gen-x", "gen-y", "c", "cam"]
    scored_items = [
        ev.Scored(item=i, verdict=verdict(s))
        for i, s in zip(items, [0.9, 0.3, 0.4, 0.6], strict=True)
    ]
    groups = ev.report(scored_items, cal.EMPTY, POLICY)["by_group"]
    # A generator's fakes are ranked against every real item; a camera's reals give FPR.
    assert groups["gen-x"]["auc"] == 1.0 and groups["gen-y"]["auc"] == 0.0
    assert groups["cam"]["at_review"]["fpr"] == 1.0 and groups["c"]["at_review"]["fpr"] == 0.0


def test_cross_validation_scores_trained_on_items_with_their_out_of_fold_scores(
    tmp_path: Path,
) -> None:
    from synthwatch.digest import file_sha256

    path = tmp_path / "seen.jpg"
    path.write_bytes(b"an item the shipped model was trained on")
    item = ev.Scored(item=Labelled(path, "seen.jpg", 1), verdict=verdict(0.99))
    other = ev.Scored(item=Labelled(tmp_path / "gone.jpg", "gone.jpg", 0), verdict=verdict(0.2))
    oof = {"m": {file_sha256(path): 0.31}}
    replaced, kept = ev.with_out_of_fold([item, other], oof)
    assert replaced.verdict is not None and replaced.verdict.signals[0].raw_score == 0.31
    assert kept.verdict == other.verdict


def test_geometry_normalisation_gives_every_still_one_shape(tmp_path: Path) -> None:
    from PIL import Image

    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (900, 400), "red").save(wide)
    out = ev.normalise_geometry(wide, tmp_path / "n.png", 256)
    with Image.open(out) as image:
        assert image.size == (256, 256) and image.format == "PNG"
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypisom")
    assert ev.normalise_geometry(clip, tmp_path / "c.png", 256) == clip  # not a still
