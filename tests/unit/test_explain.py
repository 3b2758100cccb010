"""Heatmaps: the map lights up where the detector's evidence is, and nowhere when it saw
nothing. The runtime's occlusion maps (`operators/heatmap.py`) need only a scorer; the
Grad-CAM they replaced stays as the benchmark's reference (`benchmarks/gradcam.py`)."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks.gradcam import grad_cam, last_conv
from synthwatch.operators import heatmap
from synthwatch.operators.heatmap import occlusion, overlay, patch_occlusion, png, rise

F32 = npt.NDArray[np.float32]


def quadrant_score(batch: F32) -> F32:
    """A detector that reads only the mean of the top-right quadrant."""
    h, w = batch.shape[2:]
    out: F32 = batch[:, :, : h // 2, w // 2 :].mean(axis=(1, 2, 3)).astype(np.float32)
    return out


def textured(side: int = 64, seed: int = 0) -> F32:
    return np.random.default_rng(seed).random((3, side, side), dtype=np.float32)


def quadrant_texture(batch: F32) -> F32:
    """A detector that reads only the fine detail of the top-right quadrant."""
    h, w = batch.shape[2:]
    quadrant = batch[:, :, : h // 2, w // 2 :]
    out: F32 = np.abs(np.diff(quadrant, axis=3)).mean(axis=(1, 2, 3)).astype(np.float32)
    return out


@pytest.mark.parametrize(
    ("score", "fill"),
    [
        (quadrant_score, "grey"),
        (quadrant_score, "mean"),
        (quadrant_texture, "blur"),
    ],
)
def test_occlusion_heat_is_in_the_quadrant_the_score_reads(
    score: heatmap.Scorer, fill: str
) -> None:
    # Bright where the detector looks, so hiding any of it lowers the score. A blur keeps
    # a region's mean: it hides fine detail, not brightness; a flat square hides both but
    # adds sharp edges of its own, which a detector of fine detail reads as more detail.
    image = textured() * 0.2
    image[:, :32, 32:] += 0.8
    heat = occlusion(score, image, fill=fill)  # type: ignore[arg-type]
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert heat[:32, 32:].sum() > 0.9 * heat.sum()
    # Away from the quadrant's edge (one occluder wide) there is no heat at all.
    assert heat[40:, :24].max() == 0.0
    assert heat[4:28, 36:60].min() > 0.3


def test_occlusion_of_a_score_that_ignores_the_image_is_all_zeros() -> None:
    heat = occlusion(lambda b: np.full(len(b), 0.73, dtype=np.float32), textured())
    assert heat.shape == (64, 64) and not heat.any()


def test_hiding_evidence_against_a_fake_is_not_evidence_for_one() -> None:
    # The score falls as the top-right quadrant brightens: hiding it raises the score,
    # and a map of the positive part only is empty.
    image = textured() * 0.2
    image[:, :32, 32:] += 0.8
    heat = occlusion(lambda b: 1.0 - quadrant_score(b), image, fill="grey")
    assert not heat.any()


def test_occlusion_batches_the_copies_within_the_bound() -> None:
    sizes: list[int] = []

    def score(batch: F32) -> F32:
        assert batch.shape[1:] == (3, 128, 128) and batch.dtype == np.float32
        sizes.append(len(batch))
        return quadrant_score(batch)

    occlusion(score, textured(128), max_batch=32)
    # 1/8 of the side (16 px) every 8 px: 15 x 15 windows, plus the original.
    assert sum(sizes) == 15 * 15 + 1
    assert max(sizes) == 32 and len(sizes) == -(-226 // 32)


def test_occlusion_refuses_bad_input_and_bad_scorers() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        occlusion(quadrant_score, np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="scores for a batch"):
        occlusion(lambda b: np.zeros(1, dtype=np.float32), textured())
    with pytest.raises(ValueError, match="non-finite"):
        occlusion(lambda b: np.full(len(b), np.nan, dtype=np.float32), textured())
    with pytest.raises(ValueError, match="fill"):
        occlusion(quadrant_score, textured(), fill="pink")  # type: ignore[arg-type]


def test_rise_heat_is_in_the_quadrant_the_score_reads() -> None:
    image = textured() * 0.2
    image[:, :32, 32:] += 0.8
    heat = rise(quadrant_score, image)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert heat[:32, 32:].mean() > 4 * heat[32:, :32].mean()
    assert heat[4:28, 36:60].mean() > 0.5
    # The masks come from the seed: the same map every time, another with another seed.
    np.testing.assert_array_equal(rise(quadrant_score, image), heat)
    assert not np.array_equal(rise(quadrant_score, image, seed=1), heat)


def test_rise_of_a_score_that_ignores_the_image_is_all_zeros() -> None:
    assert not rise(lambda b: np.full(len(b), 0.4, dtype=np.float32), textured()).any()


def test_rise_batches_its_masks_within_the_bound() -> None:
    sizes: list[int] = []

    def score(batch: F32) -> F32:
        assert batch.shape[1:] == (3, 64, 64) and batch.dtype == np.float32
        assert batch.min() >= 0.0 and batch.max() <= 1.0
        sizes.append(len(batch))
        return quadrant_score(batch)

    rise(score, textured(), masks=100, max_batch=32)
    assert sizes == [32, 32, 32, 4]
    with pytest.raises(ValueError, match="RISE"):
        rise(score, textured(), masks=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        rise(score, np.zeros((3, 8), dtype=np.float32))


def texture(batch: F32) -> F32:
    """Like the fingerprint model, it reads fine detail: neighbouring pixels' differences."""
    out: F32 = np.abs(np.diff(batch, axis=3)).mean(axis=(1, 2, 3)).astype(np.float32)
    return out


def test_patch_occlusion_leaves_patches_out_of_the_mean_and_scores_only_patches() -> None:
    shapes: list[tuple[int, ...]] = []

    def score(batch: F32) -> F32:
        shapes.append(batch.shape)
        return texture(batch)

    image = np.full((3, 128, 192), 0.4, dtype=np.float32)
    image[:, 70:120, 10:60] = textured(50)[:, :, :50]  # inside the bottom-left patch
    heat = patch_occlusion(score, image, 64, max_batch=8)
    assert heat.shape == (128, 192) and heat.max() == pytest.approx(1.0)
    assert all(s[1:] == (3, 64, 64) and s[0] <= 8 for s in shapes)
    # 3 x 5 windows every 32 px (the 2 x 3 patches among them), each scored once.
    assert sum(s[0] for s in shapes) == 3 * 5
    assert heat[64:, :64].mean() > 0.5
    assert heat[:, 128:].max() == 0.0 and heat[:32].max() == 0.0


def test_patch_occlusion_of_a_uniform_image_is_all_zeros_and_checks_its_input() -> None:
    assert not patch_occlusion(texture, np.full((3, 128, 128), 0.3, dtype=np.float32), 64).any()
    with pytest.raises(ValueError, match="multiples"):
        patch_occlusion(texture, textured(100), 64)
    # One patch has no mean to be left out of: occlusion of the patch itself.
    one = textured(64)
    np.testing.assert_array_equal(patch_occlusion(texture, one, 64), occlusion(texture, one))


def test_overlay_renders_at_the_image_size() -> None:
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:10, :10] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(int) - 90).sum(axis=2)
    assert changed[:20, :20].mean() > 2 * changed[40:, 40:].mean()
    decoded = Image.open(io.BytesIO(png(out)))
    assert decoded.size == (64, 64)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_explainer_and_its_heatmaps_do_not_import_torch() -> None:
    root = Path(heatmap.__file__).parent
    for name in ("heatmap.py", "explainer.py"):
        assert not {m for m in _imports(root / name) if m.split(".")[0] == "torch"}, name
    code = "import sys, synthwatch.operators.heatmap; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


# --- the explainer -----------------------------------------------------------------------


def _signal(model: str, name: str = "sbi_face", modality: str = "face"):  # type: ignore[no-untyped-def]
    from synthwatch.schemas import Signal

    return Signal(
        name=name,
        model=model,
        score=0.95,
        weight=1.0,
        calibrated=True,
        modality=modality,  # type: ignore[arg-type]
    )


def test_decide_draws_no_heatmap_from_weights_other_than_the_verdicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A canary or a rolling upgrade: detect scored with other weights than decide holds.
    # Its heatmap, drawn from decide's weights but labelled with the verdict's model,
    # would be false evidence.
    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.explainer import Explainer
    from synthwatch.operators.infer import TorchBackend
    from synthwatch.schemas import FaceBox, FrameResult

    store = ModelStore(tmp_path)
    loaded: list[str] = []

    def scorer(name: str) -> heatmap.Scorer:
        loaded.append(name)
        return TorchBackend(store.load_torch(name)).run

    explainer = Explainer(store, scorer, review_threshold=0.5)
    ours = f"sbi_face@{store.weights_id('sbi_face')[:12]}"

    assert explainer.explains(_signal(ours))
    assert not explainer.explains(_signal("sbi_face@0123456789ab"))
    assert not explainer.explains(_signal("retired@0123456789ab", name="retired"))

    face = FaceBox(x0=8, y0=8, x1=56, y1=56, confidence=0.99, score=0.95)
    frame = FrameResult(index=0, time_s=0.0, score=0.95, region="faces", faces=[face])
    image = np.full((64, 64, 3), 128, dtype=np.uint8)

    other = SimpleNamespace(signals=[_signal("sbi_face@0123456789ab")])
    assert explainer.overlays(other, frame, image) == []  # type: ignore[arg-type]
    assert loaded == []  # no model is loaded for a verdict it cannot explain
    same = SimpleNamespace(signals=[_signal(ours)])
    got = explainer.overlays(same, frame, image)  # type: ignore[arg-type]
    assert [o.role for o in got] == ["heatmap"]
    assert got[0].note == f"occlusion map of {ours} on face 0 (crop 1.3x the box)"
    explainer.overlays(same, frame, image)  # type: ignore[arg-type]
    assert loaded == ["sbi_face"]  # once, then kept


def test_a_frame_map_scores_the_patch_model_only_at_its_patch_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The production scorer is a fixed-shape ONNX export: a patch model's frame square is
    # scored patch by patch, and the map finds the texture that makes the score.
    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.explainer import Explainer, frame_view
    from synthwatch.schemas import FrameResult

    store = ModelStore(tmp_path)
    shapes: set[tuple[int, ...]] = set()

    def recorded(batch: F32) -> F32:
        shapes.add(batch.shape[1:])
        return texture(batch)

    explainer = Explainer(store, lambda name: recorded, review_threshold=0.5)
    ours = f"fingerprint@{store.weights_id('fingerprint')[:12]}"
    image = np.full((300, 400, 3), 100, dtype=np.uint8)
    # The centred 256x256 square starts at (22, 72); a noisy blob in its top-left patch.
    rng = np.random.default_rng(0)
    image[30:70, 80:120] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    frame = FrameResult(index=0, time_s=0.0, score=0.9, region="frame")
    verdict = SimpleNamespace(signals=[_signal(ours, name="fingerprint", modality="image")])
    (got,) = explainer.overlays(verdict, frame, image)  # type: ignore[arg-type]
    assert shapes == {(3, 64, 64)}
    assert got.note == (
        f"occlusion map of {ours}, centred 256x256 square at native resolution, "
        "each 64x64 patch left out of the mean in turn"
    )
    assert Image.open(io.BytesIO(got.png)).size == (256, 256)

    square, _, by_patch = frame_view(image, 64, "patches")
    assert by_patch and square.shape == (256, 256, 3)
    x = np.ascontiguousarray(square.astype(np.float32).transpose(2, 0, 1) / 255)
    heat = patch_occlusion(texture, x, 64)
    assert heat[8:48, 8:48].mean() > 0.5 and heat[96:, 96:].max() == 0.0


def test_a_scene_model_gets_a_rise_map_and_a_small_frame_one_patch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.explainer import Explainer
    from synthwatch.schemas import FrameResult

    store = ModelStore(tmp_path)
    shapes: dict[str, set[tuple[int, ...]]] = {}

    def scorer(name: str) -> heatmap.Scorer:
        def run(batch: F32) -> F32:
            shapes.setdefault(name, set()).add(batch.shape[1:])
            return texture(batch)

        return run

    explainer = Explainer(store, scorer, review_threshold=0.5)
    frame = FrameResult(index=0, time_s=0.0, score=0.9, region="frame")
    image = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    scene = f"scene_probe@{store.weights_id('scene_probe')[:12]}"
    verdict = SimpleNamespace(signals=[_signal(scene, name="scene_probe", modality="image")])
    (got,) = explainer.overlays(verdict, frame, image)  # type: ignore[arg-type]
    assert got.note == f"RISE map of {scene}, centre square resized to 224x224"
    assert shapes["scene_probe"] == {(3, 224, 224)}

    fingerprint = f"fingerprint@{store.weights_id('fingerprint')[:12]}"
    verdict = SimpleNamespace(signals=[_signal(fingerprint, name="fingerprint", modality="image")])
    (got,) = explainer.overlays(verdict, frame, image[:40, :50])  # type: ignore[arg-type]
    assert got.note == (
        f"occlusion map of {fingerprint}, the 50x40 image padded by reflection to one 64x64 patch"
    )
    assert shapes["fingerprint"] == {(3, 64, 64)}


RACE = """
import threading
import numpy as np
import torch
from synthwatch.models.nets import SbiFaceNet
from synthwatch.operators.heatmap import occlusion
from synthwatch.operators.infer import TorchBackend

torch.set_num_threads(1)
torch.manual_seed(0)
score = TorchBackend(SbiFaceNet().eval()).run
rng = np.random.default_rng(0)
images = [rng.random((3, 64, 64), dtype=np.float32) for _ in range(2)]
alone = [occlusion(score, x) for x in images]
wrong = []

def explain(k):
    for _ in range(3):
        if not np.allclose(occlusion(score, images[k]), alone[k], atol=1e-4):
            wrong.append(k)

threads = [threading.Thread(target=explain, args=(k,)) for k in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("wrong", len(wrong))
"""


def test_two_threads_explaining_with_one_scorer_at_once_each_get_their_own_heatmap() -> None:
    # `scan` writes the evidence of two alerting items at once, through one backend per
    # model. (Grad-CAM's hooks on a shared module crashed the process there; occlusion
    # only runs forward passes.) In a child process, so a crash fails this test instead
    # of ending the test run.
    proc = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"crashed: rc {proc.returncode} {proc.stderr[-500:]}"
    assert proc.stdout.strip() == "wrong 0"


# --- Grad-CAM, the benchmark's reference ---------------------------------------------------


class FindsRed(nn.Module):
    """A detector whose score rises with pure red pixels, wherever they are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 1, 1] = 1.0
            self.conv.weight[:, 1, 1, 1] = -1.0
            self.conv.weight[:, 2, 1, 1] = -1.0
            self.conv.bias.fill_(-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.relu(self.conv(x)).mean(dim=(1, 2, 3)) * 10.0)


def red_corner(n: int = 2) -> F32:
    batch = np.full((n, 3, 32, 32), 0.5, dtype=np.float32)
    batch[:, :, :12, :12] = np.array([1.0, 0.0, 0.0], dtype=np.float32).reshape(3, 1, 1)
    return batch


def test_grad_cam_is_where_the_evidence_is_and_leaves_the_model_unchanged() -> None:
    model = FindsRed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heat = grad_cam(model, red_corner())
    assert heat.shape == (2, 32, 32)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    for h in heat:
        assert h[:10, :10].mean() > 0.8
        assert h[16:, 16:].max() == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_and_occlusion_agree_on_the_toy_detector() -> None:
    model = FindsRed().eval()
    cam = grad_cam(model, red_corner(1))[0]

    def score(batch: F32) -> F32:
        with torch.no_grad():
            out: F32 = model(torch.from_numpy(batch)).numpy()
        return out

    occ = occlusion(score, red_corner(1)[0], fill="grey")
    assert occ[:10, :10].mean() > 0.8 and occ[20:, 20:].max() == 0.0
    assert np.corrcoef(cam.ravel(), occ.ravel())[0, 1] > 0.8


def test_grad_cam_is_empty_when_the_score_ignores_the_image() -> None:
    class Blind(FindsRed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.conv(x).mean(dim=(1, 2, 3)) * 0.0)

    assert not grad_cam(Blind(), red_corner(1)).any()


def test_grad_cam_of_a_module_without_conv_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no Conv2d"):
        last_conv(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="batch"):
        grad_cam(FindsRed(), np.zeros((3, 32, 32), dtype=np.float32))
