"""Training our own detectors: pseudo-fake generators, nets, data split, reproducible runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from synthwatch.digest import file_sha256
from synthwatch.models.export import export_onnx
from synthwatch.models.mtcnn import Detection
from synthwatch.models.nets import (
    FINGERPRINT_PATCH,
    SBI_INPUT_SIZE,
    FingerprintNet,
    SbiFaceNet,
    weight_bytes,
)
from synthwatch.train.data import RealFrame, collect_real, detect_faces, split_by_source
from synthwatch.train.fingerprint import (
    UPSAMPLERS,
    fingerprint_pair,
    patch_grid,
    simulate_generator,
)
from synthwatch.train.loop import Recipe, train_fingerprint, train_sbi
from synthwatch.train.sbi import Face, degrade_alike, sbi_pair, self_blend
from tests.media_factory import make_video

WEIGHTS = Path(__file__).resolve().parents[2] / "synthwatch" / "models" / "weights"
TINY = Recipe(steps=3, batch_pairs=2, warmup_steps=1, val_pairs=4, checkpoints=1)


def _pink_noise(seed: int, size: int = 256) -> np.ndarray:
    """A colour image with a natural 1/f spectrum and no periodic structure at all."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    radius[0, 0] = 1.0
    planes = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius
        planes.append(np.real(np.fft.ifft2(spectrum)))
    image = np.stack(planes, axis=2)
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return image.round().astype(np.uint8)


def _face(seed: int = 0, *, landmarks: bool = True) -> Face:
    """A 256x256 crop with a skin-coloured ellipse where MTCNN would put a face."""
    image = _pink_noise(seed)
    ys, xs = np.mgrid[0:256, 0:256]
    inside = ((xs - 128) / 70) ** 2 + ((ys - 135) / 90) ** 2 <= 1
    image[inside] = (0.5 * image[inside] + [110, 80, 60]).astype(np.uint8)
    points = np.array([[100, 110], [156, 110], [128, 140], [105, 170], [151, 170]], float)
    return Face(
        image=image, box=(69.0, 69.0, 187.0, 187.0), landmarks=points if landmarks else None
    )


# --------------------------------------------------------------------------- SBI


@pytest.mark.parametrize("landmarks", [True, False])
def test_self_blend_changes_pixels_only_inside_the_mask(landmarks: bool) -> None:
    face = _face(landmarks=landmarks)
    for seed in range(8):
        blend = self_blend(face, np.random.default_rng(seed))
        assert blend.fake.shape == blend.real.shape == (256, 256, 3)
        assert blend.fake.dtype == blend.real.dtype == np.uint8
        assert blend.mask.dtype == np.float32 and blend.mask.shape == (256, 256)
        assert blend.mask.min() >= 0.0 and blend.mask.max() <= 1.0
        outside = blend.mask == 0
        np.testing.assert_array_equal(blend.fake[outside], blend.real[outside])
        assert (blend.fake != blend.real).any(axis=2)[~outside].mean() > 0.3
        # The blended region is the face: its centre of mass lies inside the face box.
        ys, xs = np.nonzero(blend.mask)
        assert 69 < xs.mean() < 187 and 69 < ys.mean() < 187


def test_self_blend_is_a_function_of_the_generator_state() -> None:
    a = self_blend(_face(), np.random.default_rng(3))
    b = self_blend(_face(), np.random.default_rng(3))
    c = self_blend(_face(), np.random.default_rng(4))
    np.testing.assert_array_equal(a.fake, b.fake)
    assert not np.array_equal(a.fake, c.fake)


def test_sbi_pair_gives_net_sized_real_and_fake() -> None:
    real, fake = sbi_pair(_face(), np.random.default_rng(0))
    assert real.shape == fake.shape == (SBI_INPUT_SIZE, SBI_INPUT_SIZE, 3)
    assert real.dtype == fake.dtype == np.uint8
    assert not np.array_equal(real, fake)


def test_quality_degradation_is_drawn_once_for_real_and_fake() -> None:
    image = _pink_noise(1)
    for seed in range(10):
        first, second = degrade_alike([image, image.copy()], np.random.default_rng(seed))
        np.testing.assert_array_equal(first, second)


# --------------------------------------------------------------------------- fingerprints


def _abs_diff_nyquist(patches: list[np.ndarray]) -> float:
    """Period-2 energy of |horizontal pixel differences|, relative to the median bin."""
    total = 0.0
    for p in patches:
        d = np.abs(np.diff(p.astype(np.float64).mean(axis=2), axis=1))
        total = total + np.abs(np.fft.rfft(d - d.mean(axis=1, keepdims=True), axis=1)).mean(0)
    spectrum = np.asarray(total)
    return float(spectrum[-1] / np.median(spectrum))


def _pixel_nyquist(patches: list[np.ndarray]) -> float:
    """Energy of the (pi, pi) checkerboard frequency of the pixels, relative to the median."""
    total = 0.0
    for p in patches:
        g = p.astype(np.float64).mean(axis=2)
        total = total + np.abs(np.fft.fft2(g - g.mean()))
    spectrum = np.asarray(total)
    n = spectrum.shape[0] // 2
    return float(spectrum[n, n] / np.median(spectrum))


def test_simulated_upsampling_adds_the_expected_spectral_peaks() -> None:
    image = _pink_noise(2)
    reals = [
        np.ascontiguousarray(image[y : y + 64, x : x + 64])
        for y in (0, 64, 128, 192)
        for x in (0, 64, 128, 192)
    ]

    def fakes(method: str) -> list[np.ndarray]:
        return [
            simulate_generator(r, np.random.default_rng(i), factor=2, method=method)
            for i, r in enumerate(reals)
        ]

    # Interpolating up-samplers make neighbouring differences alternate (NPR's cue) ...
    for method in ("nearest", "bilinear", "bicubic"):
        assert _abs_diff_nyquist(fakes(method)) > 1.25 * _abs_diff_nyquist(reals), method
    # ... and a transposed convolution leaves the checkerboard in the pixels themselves.
    assert _pixel_nyquist(fakes("transposed")) > 10 * _pixel_nyquist(reals)


def test_simulated_generator_keeps_shape_and_refuses_odd_sizes() -> None:
    region = _pink_noise(3)[:72, :72]
    for method in UPSAMPLERS:
        for factor in (2, 4):
            out = simulate_generator(region, np.random.default_rng(0), factor=factor, method=method)
            assert out.shape == region.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="multiples"):
        simulate_generator(region[:70], np.random.default_rng(0), factor=4)


def test_fingerprint_pair_is_native_resolution_and_reproducible() -> None:
    image = _pink_noise(4)
    real, fake = fingerprint_pair(image, np.random.default_rng(5))
    again = fingerprint_pair(image, np.random.default_rng(5))
    assert real.shape == fake.shape == (FINGERPRINT_PATCH, FINGERPRINT_PATCH, 3)
    assert real.dtype == fake.dtype == np.uint8
    np.testing.assert_array_equal(real, again[0])
    np.testing.assert_array_equal(fake, again[1])
    assert not np.array_equal(real, fake)


def test_fingerprint_real_patch_is_an_unresized_cut_of_the_image() -> None:
    image = _pink_noise(5)
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(20):
        real, _ = fingerprint_pair(image, rng, vary=False)
        # Unless JPEG was drawn, the real patch is the image's own pixels (maybe mirrored).
        for candidate in (real, real[:, ::-1]):
            windows = np.lib.stride_tricks.sliding_window_view(
                image, candidate.shape, axis=(0, 1, 2)
            )
            if (windows == candidate).all(axis=(-3, -2, -1)).any():
                found += 1
                break
    assert found >= 5


def test_patch_grid_tiles_without_resizing() -> None:
    image = _pink_noise(6)[:200, :256]
    tiles = patch_grid(image, patch=64)
    assert len(tiles) == 3 * 4
    np.testing.assert_array_equal(tiles[5], image[64:128, 64:128])
    assert len(patch_grid(image, patch=64, limit=5)) == 5
    assert patch_grid(image[:40], patch=64) == []


# --------------------------------------------------------------------------- nets


@pytest.mark.parametrize(
    ("net_cls", "side"), [(SbiFaceNet, SBI_INPUT_SIZE), (FingerprintNet, FINGERPRINT_PATCH)]
)
def test_net_exports_to_onnx_with_dynamic_batch_and_matches_torch(
    net_cls: type[SbiFaceNet | FingerprintNet], side: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = net_cls().eval()
    assert weight_bytes(net) < 1 << 20
    dest = export_onnx(net, tmp_path / "net.onnx", (1, 3, side, side))
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, side, side)
        with torch.no_grad():
            expected = net(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (batch,)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert ((expected >= 0) & (expected <= 1)).all()


@pytest.mark.parametrize(
    ("net_cls", "side"), [(SbiFaceNet, SBI_INPUT_SIZE), (FingerprintNet, FINGERPRINT_PATCH)]
)
def test_score_is_sigmoid_of_a_linear_readout_of_features_last(
    net_cls: type[SbiFaceNet | FingerprintNet], side: int
) -> None:
    # Grad-CAM needs the score to depend on `features_last` only through its channel means.
    torch.manual_seed(1)
    net = net_cls().eval()
    torch.nn.init.normal_(net.head.fc.weight)
    captured: list[torch.Tensor] = []
    net.features_last.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = torch.rand(2, 3, side, side)
    logits = net.logits(x)
    (features,) = captured
    assert features.ndim == 4 and features.shape[2] >= 4
    manual = net.head.fc(features.mean(dim=(2, 3))).squeeze(1)
    torch.testing.assert_close(logits, manual)
    torch.testing.assert_close(net(x), torch.sigmoid(logits))
    (grad,) = torch.autograd.grad(logits.sum(), features)
    assert grad.abs().sum() > 0


def test_fingerprint_net_takes_any_patch_size() -> None:
    net = FingerprintNet().eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 96, 96)).shape == (2,)
        assert net(torch.rand(1, 3, 64, 128)).shape == (1,)


# --------------------------------------------------------------------------- data


def test_split_puts_each_source_wholly_on_one_side() -> None:
    items = [(f"clip{c}", i) for c in range(10) for i in range(c + 1)]
    train, val = split_by_source(items, group=lambda it: it[0], val_fraction=0.3, seed=0)
    train_groups, val_groups = {g for g, _ in train}, {g for g, _ in val}
    assert train_groups and val_groups and not train_groups & val_groups
    assert len(train) + len(val) == len(items)
    assert len(val_groups) == 3
    # Same seed, any input order: same split. Another seed: another split.
    again = split_by_source(items[::-1], group=lambda it: it[0], val_fraction=0.3, seed=0)
    assert {g for g, _ in again[1]} == val_groups
    other = [
        frozenset(g for g, _ in split_by_source(items, group=lambda it: it[0], seed=s)[1])
        for s in range(5)
    ]
    assert len(set(other)) > 1


def test_split_by_items_bounds_the_share_of_items_held_out() -> None:
    # One crowd clip with most of the faces must not drag half the faces into validation.
    items = [("crowd", i) for i in range(80)] + [(f"solo{c}", 0) for c in range(20)]
    for seed in range(10):
        train, val = split_by_source(
            items, group=lambda it: it[0], val_fraction=0.2, seed=seed, balance="items"
        )
        assert train and 1 <= len(val) <= 20
        assert ("crowd", 0) in train
        assert not {g for g, _ in train} & {g for g, _ in val}


def test_collect_real_samples_videos_and_stills_and_splits_by_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    make_video(tmp_path / "a.mp4", seconds=1.0, width=160, height=120)
    make_video(tmp_path / "sub" / "b.mp4", seconds=1.0, width=128, height=96)
    Image.fromarray(_pink_noise(7)[:100, :120]).save(tmp_path / "c.png")
    Image.fromarray(_pink_noise(8)[:90, :90]).save(tmp_path / "sub" / "d.jpg", quality=90)
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "copy.png").write_bytes((tmp_path / "c.png").read_bytes())

    real = collect_real([tmp_path], frames_per_video=4, include_bundled=False)

    by_source = {Path(s.source).name: s for s in real.sources}
    assert sorted(by_source) == ["a.mp4", "b.mp4", "c.png", "d.jpg"]
    assert [Path(s).name for s, reason in real.skipped] == ["copy.png"]
    assert len(by_source["a.mp4"].frame_times) == 4 and by_source["a.mp4"].media_type == "video"
    assert by_source["c.png"].frame_times == (0.0,)
    assert (
        by_source["d.jpg"].sha256
        == hashlib.sha256((tmp_path / "sub" / "d.jpg").read_bytes()).hexdigest()
    )
    assert len(real.frames) == 4 + 4 + 1 + 1
    assert real.frames[0].image.shape == (120, 160, 3)
    for seed in range(6):
        train, val = split_by_source(
            real.frames, group=lambda f: f.group, val_fraction=0.5, seed=seed
        )
        assert not {f.source for f in train} & {f.source for f in val}


def test_bundled_photographs_are_included_with_their_file_hashes(tmp_path: Path) -> None:
    real = collect_real([tmp_path], include_bundled=True)
    names = [s.source for s in real.sources]
    assert "skimage:astronaut.png" in names and "sklearn:china.jpg" in names
    assert not any("hubble" in n or "retina" in n for n in names)
    moto = [s for s in real.sources if "motorcycle" in s.source]
    assert len(moto) == 2 and moto[0].group == moto[1].group
    assert all(len(s.sha256) == 64 for s in real.sources)


class _CentreFace:
    """A stand-in face detector: one face in the middle of every frame, with landmarks."""

    def detect(self, frames: list[np.ndarray]) -> list[list[Detection]]:
        out = []
        for frame in frames:
            h, w = frame.shape[:2]
            s = min(h, w) / 2
            cx, cy = w / 2, h / 2
            points = (
                (cx - s / 4, cy - s / 6),
                (cx + s / 4, cy - s / 6),
                (cx, cy),
                (cx - s / 5, cy + s / 4),
                (cx + s / 5, cy + s / 4),
            )
            out.append([Detection(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2, 0.99, points)])
        return out


def test_faces_are_cut_as_the_scanner_cuts_them_with_landmarks_in_crop_pixels() -> None:
    image = _pink_noise(9)[:200, :240]
    (face,) = detect_faces([RealFrame("x", "x", 0.0, image)], _CentreFace(), size=130)
    # Box 100 wide, enlarged 1.3x = 130 pixels: the crop is at scale 1.
    assert face.face.image.shape == (130, 130, 3)
    assert face.face.box == pytest.approx((15.0, 15.0, 115.0, 115.0))
    assert face.face.landmarks is not None
    assert face.face.landmarks[2] == pytest.approx((65.0, 65.0))
    np.testing.assert_array_equal(face.face.image, image[35:165, 55:185])


# --------------------------------------------------------------------------- training


def _media_dir(root: Path) -> Path:
    root.mkdir()
    for i in range(4):
        Image.fromarray(_pink_noise(10 + i)[:128, :160]).save(root / f"img{i}.png")
    return root


def test_tiny_sbi_run_is_bit_for_bit_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    media = _media_dir(tmp_path / "media")
    runs = [
        train_sbi(
            [media],
            tmp_path / name,
            face_detector=_CentreFace(),
            seed=seed,
            recipe=TINY,
            include_bundled=False,
        )
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert runs[0].weights_sha256 == runs[1].weights_sha256
    assert runs[0].weights_sha256 != runs[2].weights_sha256
    assert file_sha256(runs[0].weights) == runs[0].weights_sha256
    report = json.loads(runs[0].report.read_text())
    assert report["weights_sha256"] == runs[0].weights_sha256
    assert report["seed"] == 0 and report["recipe"]["steps"] == 3
    splits = {Path(s["source"]).name: s["split"] for s in report["data"]["sources"]}
    assert sorted(splits) == [f"img{i}.png" for i in range(4)]
    assert set(splits.values()) == {"train", "val"}
    state = torch.load(runs[0].weights, weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in state.items() if "num_batches" not in k)
    SbiFaceNet().load_state_dict(state)


def test_tiny_fingerprint_run_is_bit_for_bit_reproducible_and_seed_dependent(
    tmp_path: Path,
) -> None:
    media = _media_dir(tmp_path / "media")
    runs = [
        train_fingerprint([media], tmp_path / name, seed=seed, recipe=TINY, include_bundled=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert runs[0].weights_sha256 == runs[1].weights_sha256
    assert runs[0].weights_sha256 != runs[2].weights_sha256
    report = json.loads(runs[0].report.read_text())
    assert 0.0 <= report["validation"]["auc"] <= 1.0
    assert report["data"]["counts"]["source_files"] == 4
    FingerprintNet().load_state_dict(torch.load(runs[0].weights, weights_only=True))


def test_training_leaves_the_callers_torch_settings_alone(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_fingerprint(
        [_media_dir(tmp_path / "media")], tmp_path / "out", recipe=TINY, include_bundled=False
    )
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("name", "net_cls"), [("sbi_face", SbiFaceNet), ("fingerprint", FingerprintNet)]
)
def test_shipped_weights_match_their_reports(
    name: str, net_cls: type[SbiFaceNet | FingerprintNet]
) -> None:
    weights, report = WEIGHTS / f"{name}.pt", WEIGHTS / f"{name}.json"
    details = json.loads(report.read_text())
    assert file_sha256(weights) == details["weights_sha256"]
    assert details["seed"] == 0 and 0.5 < details["validation"]["auc"] <= 1.0
    net_cls().load_state_dict(torch.load(weights, weights_only=True))


@pytest.mark.shared
def test_mtcnn_finds_the_astronaut_with_landmarks_inside_her_crop(shared_dir: Path) -> None:
    from synthwatch.train.loop import _detector

    detector = _detector(shared_dir / "weights" / "mtcnn")
    real = collect_real([], include_bundled=True)
    astronaut = [f for f in real.frames if f.source == "skimage:astronaut.png"]
    (face,) = detect_faces(astronaut, detector)
    assert face.face.image.shape == (256, 256, 3)
    assert face.face.landmarks is not None
    assert ((face.face.landmarks > 0) & (face.face.landmarks < 256)).all()
    # Eyes above the mouth corners, left eye left of the right eye.
    left_eye, right_eye, _, left_mouth, _ = face.face.landmarks
    assert left_eye[0] < right_eye[0] and left_eye[1] < left_mouth[1]
