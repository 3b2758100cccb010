"""Inference backends: every backend layout and slicing gives each row its own score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from synthwatch.models.export import export_onnx
from synthwatch.operators.infer import OnnxRuntimeBackend, TorchBackend, select_backend


class _TinyImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return torch.sigmoid(self.head(h)).reshape(-1)


class _TinyAudioNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(x)).reshape(-1)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).random((n, 3, 8, 8), dtype=np.float32)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return export_onnx(_TinyImageNet(), tmp_path / "tiny.onnx", (1, 3, 8, 8))


@pytest.mark.parametrize("rows_per_run", [0, 1, 3])
def test_onnxruntime_scores_a_batch_as_its_rows_scored_alone(
    onnx_file: Path, rows_per_run: int
) -> None:
    backend = OnnxRuntimeBackend(onnx_file, threads=1, rows_per_run=rows_per_run)
    batch = _images(7)
    alone = np.concatenate([backend.run(batch[i : i + 1]) for i in range(7)])
    scores = backend.run(batch)
    assert scores.shape == (7,)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-6)


def test_onnxruntime_slices_of_a_non_contiguous_batch_score_correctly(onnx_file: Path) -> None:
    backend = OnnxRuntimeBackend(onnx_file, threads=1)
    batch = _images(4)
    flipped = batch[:, :, :, ::-1]
    expected = OnnxRuntimeBackend(onnx_file, threads=1, rows_per_run=0).run(
        np.ascontiguousarray(flipped)
    )
    np.testing.assert_allclose(backend.run(flipped), expected, rtol=1e-5, atol=1e-6)


def test_torch_channels_last_gives_the_same_scores_as_nchw() -> None:
    batch = _images(5)
    nchw = TorchBackend(_TinyImageNet()).run(batch)
    nhwc = TorchBackend(_TinyImageNet(), channels_last=True).run(batch)
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-5, atol=1e-6)


def test_torch_channels_last_leaves_non_image_batches_as_they_are() -> None:
    batch = np.random.default_rng(2).random((3, 16), dtype=np.float32)
    expected = TorchBackend(_TinyAudioNet()).run(batch)
    got = TorchBackend(_TinyAudioNet(), channels_last=True).run(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_select_backend_torch_on_cpu_runs_images_channels_last(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU the torch backend keeps NCHW")
    backend = select_backend(
        "torch",
        onnx_path=lambda: tmp_path / "unused.onnx",
        onnx_model=lambda: b"",
        torch_module=_TinyImageNet,
        threads=1,
        max_batch=8,
        engine_cache_dir=tmp_path,
    )
    assert isinstance(backend, TorchBackend)
    assert backend.channels_last
    np.testing.assert_allclose(
        backend.run(_images(2)), TorchBackend(_TinyImageNet()).run(_images(2)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("gpu", "tensorrt", "expected"),
    [(False, False, "onnxruntime"), (True, False, "torch"), (True, True, "tensorrt")],
)
def test_auto_uses_the_gpu_whenever_there_is_one(
    monkeypatch: pytest.MonkeyPatch, gpu: bool, tensorrt: bool, expected: str
) -> None:
    # A GPU machine without TensorRT used to get ONNX Runtime on the CPU, beside the
    # decoders, with the GPU idle.
    from synthwatch.operators import infer

    monkeypatch.setattr(infer, "gpu_available", lambda: gpu)
    monkeypatch.setattr(infer, "tensorrt_available", lambda: tensorrt)
    assert infer.resolve_backend_name("auto") == expected
    assert infer.resolve_backend_name("onnxruntime") == "onnxruntime"
