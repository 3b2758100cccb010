"""AASIST / AASIST-L port: the upstream weights load strictly and score as upstream does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.aasist import (
    AASIST_CONFIG,
    AASIST_L_CONFIG,
    Aasist,
    AasistScorer,
    build_aasist,
    build_aasist_l,
    sinc_filterbank,
)
from synthwatch.models.export import export_onnx
from synthwatch.models.speech import INPUT_SAMPLES, SAMPLE_RATE

Builder = Callable[[Sequence[Path]], nn.Module]
MODELS: list[tuple[str, Builder, int]] = [
    # Parameter counts reported in the AASIST paper (297K and 85K).
    ("AASIST.pth", build_aasist, 297_866),
    ("AASIST-L.pth", build_aasist_l, 85_306),
]


def _probe_signals() -> torch.Tensor:
    """A 100 Hz -> 4 kHz chirp and an amplitude-modulated harmonic tone (both 0.1 peak)."""
    t = np.arange(INPUT_SAMPLES) / SAMPLE_RATE
    duration = INPUT_SAMPLES / SAMPLE_RATE
    chirp = 0.1 * np.sin(2 * np.pi * (100 * t + (4000 - 100) / (2 * duration) * t**2))
    harmonics = sum(0.05 / k * np.sin(2 * np.pi * 150 * k * t) for k in range(1, 11))
    tone = harmonics * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return torch.from_numpy(np.stack([chirp, tone]).astype(np.float32))


def _noise(n: int, seed: int) -> torch.Tensor:
    return 0.05 * torch.randn(n, INPUT_SAMPLES, generator=torch.Generator().manual_seed(seed))


def _random_scorer(seed: int = 0) -> AasistScorer:
    torch.manual_seed(seed)
    return AasistScorer(Aasist(AASIST_L_CONFIG)).eval()


def test_sinc_bank_splits_the_band_without_gaps_or_overlap() -> None:
    bank = sinc_filterbank(70, 129)[:, 0, :].astype(np.float64)
    assert bank.shape == (70, 129)
    np.testing.assert_allclose(bank, bank[:, ::-1], atol=1e-9)  # linear phase
    # Adjacent ideal bands telescope to an all-pass: the filters sum to a unit impulse.
    impulse = np.zeros(129)
    impulse[64] = 1.0
    np.testing.assert_allclose(bank.sum(axis=0), impulse, atol=1e-6)
    # Centre frequencies rise filter by filter, mel-spaced: dense at the bottom.
    response = np.abs(np.fft.rfft(bank, n=4096, axis=1))
    peaks_hz = response.argmax(axis=1) * SAMPLE_RATE / 4096
    assert np.all(np.diff(peaks_hz) >= 0) and peaks_hz[-1] > 7000
    assert peaks_hz[1] - peaks_hz[0] < peaks_hz[-1] - peaks_hz[-2]


def test_score_is_a_probability_per_waveform() -> None:
    scorer = _random_scorer()
    batch = torch.cat([_noise(2, 0), torch.zeros(1, INPUT_SAMPLES), 50 * _noise(1, 1)])
    with torch.no_grad():
        scores = scorer(batch)
        logits = scorer.model(batch)
    assert scores.shape == (4,)
    assert bool(torch.isfinite(scores).all()) and bool(((scores >= 0) & (scores <= 1)).all())
    # Index 0 of the upstream logits is spoof, index 1 bona fide.
    torch.testing.assert_close(scores, torch.sigmoid(logits[:, 0] - logits[:, 1]))


def test_scores_do_not_depend_on_the_rest_of_the_batch() -> None:
    scorer = _random_scorer()
    batch = _noise(3, 2)
    with torch.no_grad():
        together = scorer(batch)
        alone = torch.cat([scorer(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_wrong_input_length_is_refused() -> None:
    with pytest.raises(ValueError, match=f"{INPUT_SAMPLES}"):
        _random_scorer()(torch.zeros(1, 16000))


def test_builder_restores_every_weight(tmp_path: Path) -> None:
    original = Aasist(AASIST_CONFIG).eval()
    path = tmp_path / "aasist.pth"
    torch.save(original.state_dict(), path)
    restored = build_aasist([path])
    assert not restored.training
    x = _noise(2, 3)
    with torch.no_grad():
        assert torch.equal(restored(x), torch.softmax(original(x), dim=1)[:, 0])


def test_weights_of_the_other_variant_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "aasist_l.pth"
    torch.save(Aasist(AASIST_L_CONFIG).state_dict(), path)
    with pytest.raises(ModelUnavailable, match="do not fit AASIST"):
        build_aasist([path])


def test_extra_or_missing_keys_fail_loudly(tmp_path: Path) -> None:
    state = Aasist(AASIST_L_CONFIG).state_dict()
    extra = tmp_path / "extra.pth"
    torch.save({**state, "conv_time.band_pass": torch.zeros(70, 129)}, extra)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("bn1.weight")}, missing)
    for path in (extra, missing):
        with pytest.raises(ModelUnavailable, match="do not fit AASIST-L"):
            build_aasist_l([path])


def test_a_file_that_is_not_a_state_dict_fails_loudly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelUnavailable, match="cannot read"):
        build_aasist([garbage])
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ModelUnavailable, match="state dict"):
        build_aasist([tensor])


def _assert_onnx_matches(module: nn.Module, dest: Path, batches: Sequence[torch.Tensor]) -> None:
    export_onnx(module, dest, (1, INPUT_SAMPLES))
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    for batch in batches:
        with torch.no_grad():
            expected = module(batch).numpy()
        (actual,) = session.run(["score"], {"input": batch.numpy()})
        assert actual.shape == expected.shape == (len(batch),)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_onnx_export_matches_torch_at_any_batch_size(tmp_path: Path) -> None:
    scorer = _random_scorer(seed=1)
    _assert_onnx_matches(scorer, tmp_path / "aasist_l.onnx", [_noise(1, 4), _noise(3, 5)])


@pytest.mark.shared
@pytest.mark.parametrize(("filename", "builder", "n_params"), MODELS)
def test_upstream_weights_load_strictly(
    shared_dir: Path, filename: str, builder: Builder, n_params: int
) -> None:
    path = shared_dir / "weights/aasist" / filename
    state = torch.load(path, map_location="cpu", weights_only=True)
    scorer = builder([path])
    assert isinstance(scorer, AasistScorer) and not scorer.training
    model = scorer.model
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sum(p.numel() for p in model.parameters()) == n_params
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


# Logits of the upstream implementation (clovaai/aasist models/AASIST.py, run separately
# with these weights) on `_probe_signals()`. A port that drifts from upstream, e.g. by
# "fixing" the residual block's unused BatchNorm, moves these by far more than 1e-3.
UPSTREAM_LOGITS = {
    "AASIST.pth": [[4.7570, -5.9539], [-0.9224, -0.2759]],
    "AASIST-L.pth": [[6.8559, -6.1480], [4.5021, -4.0056]],
}


@pytest.mark.shared
@pytest.mark.parametrize(("filename", "builder", "n_params"), MODELS)
def test_port_reproduces_upstream_logits(
    shared_dir: Path, filename: str, builder: Builder, n_params: int
) -> None:
    scorer = builder([shared_dir / "weights/aasist" / filename])
    assert isinstance(scorer, AasistScorer)
    with torch.no_grad():
        logits = scorer.model(_probe_signals())
    np.testing.assert_allclose(logits.numpy(), UPSTREAM_LOGITS[filename], rtol=0, atol=1e-3)


@pytest.mark.shared
@pytest.mark.parametrize(("filename", "builder", "n_params"), MODELS)
def test_onnx_runtime_matches_torch_on_upstream_weights(
    shared_dir: Path, tmp_path: Path, filename: str, builder: Builder, n_params: int
) -> None:
    scorer = builder([shared_dir / "weights/aasist" / filename])
    probes = _probe_signals()
    batches = [probes[1:], torch.cat([probes, _noise(1, 6)])]
    _assert_onnx_matches(scorer, tmp_path / "model.onnx", batches)


@pytest.mark.shared
def test_engine_caps_audio_batches_to_bound_memory(shared_dir: Path, tmp_path: Path) -> None:
    # A batch of 32 AASIST windows peaks at 6.5 GB RSS on CPU; the engine caps audio
    # batches (settings.models.audio_max_batch) while image models keep max_batch.
    from synthwatch.pipeline.engine import Engine
    from synthwatch.pipeline.settings import Settings

    settings = Settings(
        model_dir=shared_dir / "weights",
        models={"audio_models": ("aasist",), "max_batch": 32, "audio_max_batch": 4},
    )
    with Engine(settings, cache_dir=tmp_path) as engine:
        (audio,) = engine.by_kind("audio")
        assert audio.batcher.max_batch == 4
        assert {d.batcher.max_batch for d in engine.by_kind("face")} == {32}
        scores = audio.score(np.zeros((10, INPUT_SAMPLES), dtype=np.float32))
        assert scores.shape == (10,) and audio.batcher.stats.recent_sizes[-1] <= 4
