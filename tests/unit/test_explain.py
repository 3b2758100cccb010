"""Grad-CAM: the heatmap lights up where the detector looked, and nowhere when it saw nothing."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from synthwatch.operators.gradcam import grad_cam, last_conv, overlay, png


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


def red_corner(n: int = 2) -> np.ndarray:
    batch = np.full((n, 3, 32, 32), 0.5, dtype=np.float32)
    batch[:, :, :12, :12] = np.array([1.0, 0.0, 0.0], dtype=np.float32).reshape(3, 1, 1)
    return batch


def test_heatmap_is_where_the_evidence_is() -> None:
    heat = grad_cam(FindsRed(), red_corner())
    assert heat.shape == (2, 32, 32)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    for h in heat:
        assert h[:10, :10].mean() > 0.8
        assert h[16:, 16:].max() == 0.0


def test_heatmap_is_empty_when_the_score_ignores_the_image() -> None:
    class Blind(FindsRed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.conv(x).mean(dim=(1, 2, 3)) * 0.0)

    heat = grad_cam(Blind(), red_corner(1))
    assert not heat.any()


def test_module_without_conv_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no Conv2d"):
        last_conv(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="batch"):
        grad_cam(FindsRed(), np.zeros((3, 32, 32), dtype=np.float32))


def test_overlay_renders_at_the_image_size_and_leaves_the_model_unchanged() -> None:
    model = FindsRed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    heat = grad_cam(model, red_corner(1))[0]
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(int) - 90).sum(axis=2)
    assert changed[:20, :20].mean() > 2 * changed[40:, 40:].mean()
    decoded = Image.open(io.BytesIO(png(out)))
    assert decoded.size == (64, 64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_decide_draws_no_heatmap_from_weights_other_than_the_verdicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A canary or a rolling upgrade: detect scored with other weights than decide holds.
    # Its heatmap, drawn from decide's weights but labelled with the verdict's model,
    # would be false evidence.
    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.explainer import Explainer
    from synthwatch.schemas import FaceBox, FrameResult, Signal

    store = ModelStore(tmp_path)
    explainer = Explainer(store, review_threshold=0.5)
    ours = f"sbi_face@{store.weights_id('sbi_face')[:12]}"

    def signal(model: str, name: str = "sbi_face") -> Signal:
        return Signal(name=name, model=model, score=0.95, weight=1.0, calibrated=True)

    assert explainer.explains(signal(ours))
    assert not explainer.explains(signal("sbi_face@0123456789ab"))
    assert not explainer.explains(signal("retired@0123456789ab", name="retired"))

    face = FaceBox(x0=8, y0=8, x1=56, y1=56, confidence=0.99, score=0.95)
    frame = FrameResult(index=0, time_s=0.0, score=0.95, region="faces", faces=[face])
    image = np.full((64, 64, 3), 128, dtype=np.uint8)

    other = SimpleNamespace(signals=[signal("sbi_face@0123456789ab")])
    assert explainer.overlays(other, frame, image) == []  # type: ignore[arg-type]
    same = SimpleNamespace(signals=[signal(ours)])
    assert [o.role for o in explainer.overlays(same, frame, image)] == ["heatmap"]  # type: ignore[arg-type]


RACE = """
import threading
import numpy as np
import torch
from synthwatch.operators.gradcam import grad_cam
from synthwatch.models.nets import SbiFaceNet

torch.set_num_threads(1)
torch.manual_seed(0)
module = SbiFaceNet().eval()
rng = np.random.default_rng(0)
batches = [rng.random((1, 3, 128, 128), dtype=np.float32) for _ in range(2)]
alone = [grad_cam(module, b) for b in batches]
wrong = []

def explain(k):
    for _ in range(100):
        if not np.allclose(grad_cam(module, batches[k]), alone[k], atol=1e-5):
            wrong.append(k)

threads = [threading.Thread(target=explain, args=(k,)) for k in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("wrong", len(wrong))
"""


def test_two_threads_explaining_one_model_at_once_each_get_their_own_heatmap() -> None:
    # `scan` writes the evidence of two alerting items at once, with one torch module per
    # model. Grad-CAM's hook and mode switches on that shared module used to cross two
    # threads' work: a segfault, or glibc aborting with "free(): corrupted unsorted
    # chunks" (the crash seen when a scan of the dev set was interrupted). In a child
    # process, so a crash fails this test instead of ending the test run.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"crashed: rc {proc.returncode} {proc.stderr[-500:]}"
    assert proc.stdout.strip() == "wrong 0"
