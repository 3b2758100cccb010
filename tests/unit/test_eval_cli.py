"""`synthwatch calibrate` and `synthwatch eval` end to end on media the test makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "SYNTHWATCH_MODEL_DIR": str(tmp_path / "empty"),
        "SYNTHWATCH_MODELS__FORENSICS": "true",
        # No third-party weights here: the ensemble is configured without AASIST.
        "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
    }
    return subprocess.run(
        [sys.executable, "-m", "synthwatch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _labelled_set(root: Path) -> Path:
    """Real photos, and 'fakes' made by 2x nearest up-sampling of half-size copies."""
    rows = ["path,label"]
    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "hubble": data.hubble_deep_field(),
    }
    for name, photo in photos.items():
        img = np.ascontiguousarray(np.asarray(photo)[:256, :256])
        real = root / "real" / f"{name}.png"
        real.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(real)
        small = Image.fromarray(img).resize((128, 128), Image.Resampling.BILINEAR)
        fake = root / "fake" / f"{name}.png"
        fake.parent.mkdir(parents=True, exist_ok=True)
        small.resize((256, 256), Image.Resampling.NEAREST).save(fake)
        rows += [f"real/{name}.png,real", f"fake/{name}.png,fake"]
    csv = root / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_calibrate_then_eval_reports_per_type_with_json_plot_and_markdown(tmp_path: Path) -> None:
    labels = _labelled_set(tmp_path / "set")
    cal_path = tmp_path / "calibration.json"
    proc = _run(["calibrate", "--labels", str(labels), "--out", str(cal_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cal = json.loads(cal_path.read_text())
    fitted = {c["signal"]: c for c in cal["calibrators"]}
    assert {"fingerprint", "residual_spectrum", "spectral_grid"} <= set(fitted)
    assert fitted["fingerprint"]["model"].startswith("fingerprint@")
    assert cal["prior"] == 0.5 and "labels.csv" in cal["fitted_on"][0]

    out = tmp_path / "report.json"
    proc = _run(
        [
            "eval",
            "--labels",
            str(labels),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "roc.png"),
            "--markdown",
            str(tmp_path / "tables.md"),
            "--folds",
            "3",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["overall"]["n"] == 12 and report["overall"]["n_fake"] == 6
    assert set(report["by_type"]) == {"image"}
    assert {"auc", "eer", "at_review", "at_flag"} <= set(report["overall"])
    assert len(report["items"]) == 12
    for item in report["items"]:
        assert {"path", "label", "synthetic_score", "decision"} <= set(item)
    assert report["cross_validated"]["folds"] == 3
    # The spectrum of a 2x nearest up-sampled image has the peaks the feature measures.
    spectrum = {i["path"]: i["signals"]["residual_spectrum"] for i in report["items"]}
    assert min(v for k, v in spectrum.items() if k.startswith("fake/")) > max(
        v for k, v in spectrum.items() if k.startswith("real/")
    )
    assert Image.open(tmp_path / "roc.png").size[0] > 100
    assert "| **overall** | 12 | 6 |" in (tmp_path / "tables.md").read_text()


def test_eval_with_a_bad_labels_file_is_one_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nmissing.jpg,fake\n")
    proc = _run(["eval", "--labels", str(csv)], tmp_path)
    assert proc.returncode == 2
    assert "missing.jpg: no such file" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
