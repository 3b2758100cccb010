"""Meso-4 / MesoInception-4 port: converted weights reproduce the upstream scores."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch

from synthwatch.errors import ModelUnavailable
from synthwatch.models.keras_h5 import keras_state_dict
from synthwatch.models.meso import INPUT_SIZE, Meso4, MesoInception4, load_keras_weights
from synthwatch.models.registry import ModelStore


def _faces(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            # Nearest, as Keras' load_img did when the authors evaluated these weights.
            rgb = im.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.NEAREST)
            arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _write_keras_h5(module: Meso4, path: Path) -> None:
    """Write `module`'s weights the way Keras 2.1 `save_weights` lays them out."""
    state = module.state_dict()
    counters = {"conv2d": 4, "batch_normalization": 4, "dense": 2}
    layer_names = []
    with h5py.File(path, "w") as f:
        for kind, prefix in Meso4.KERAS_LAYERS:
            counters[kind] += 1
            layer = f"{kind}_{counters[kind]}"
            layer_names.append(layer.encode())
            w = {
                k.removeprefix(prefix + "."): v.numpy()
                for k, v in state.items()
                if k.startswith(prefix + ".")
            }
            if kind == "conv2d":
                arrays = {"kernel": w["weight"].transpose(2, 3, 1, 0), "bias": w["bias"]}
            elif kind == "dense":
                arrays = {"kernel": w["weight"].T, "bias": w["bias"]}
            else:
                arrays = {
                    "gamma": w["weight"],
                    "beta": w["bias"],
                    "moving_mean": w["running_mean"],
                    "moving_variance": w["running_var"],
                }
            group = f.create_group(layer)
            names = [f"{layer}/{k}:0" for k in arrays]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays.values(), strict=True):
                group.create_dataset(n, data=a)
        f.attrs["layer_names"] = layer_names


def test_keras_round_trip_restores_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = Meso4().eval()
    # Non-trivial running statistics, so a swapped mean/variance would change outputs.
    with torch.no_grad():
        for bn in (original.block1.bn, original.block4.bn):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "meso4.h5"
    _write_keras_h5(original, path)

    restored = Meso4()
    load_keras_weights(restored, path, Meso4.KERAS_LAYERS)
    x = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        assert torch.equal(original(x), restored.eval()(x))


def test_weights_for_another_architecture_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "meso4.h5"
    _write_keras_h5(Meso4(), path)
    with pytest.raises(ModelUnavailable, match="do not match the architecture"):
        load_keras_weights(MesoInception4(), path, MesoInception4.KERAS_LAYERS)


def test_wrong_shapes_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "meso4.h5"
    _write_keras_h5(Meso4(), path)
    # Conv layers 1 and 2 swapped: every key is present, but the shapes are wrong.
    swapped = (
        ("conv2d", "block2.conv"),
        Meso4.KERAS_LAYERS[1],
        ("conv2d", "block1.conv"),
        *Meso4.KERAS_LAYERS[3:],
    )
    with pytest.raises(ModelUnavailable, match="weights do not fit"):
        load_keras_weights(Meso4(), path, swapped)


def test_output_is_one_fake_score_per_item() -> None:
    with torch.no_grad():
        out = Meso4().eval()(torch.rand(3, 3, INPUT_SIZE, INPUT_SIZE))
    assert out.shape == (3,)
    assert bool(((out >= 0) & (out <= 1)).all())


@pytest.mark.shared
def test_strict_load_has_no_missing_or_unexpected_keys(shared_dir: Path) -> None:
    cases: list[tuple[Meso4 | MesoInception4, str]] = [
        (Meso4(), "Meso4_DF.h5"),
        (Meso4(), "Meso4_F2F.h5"),
        (MesoInception4(), "MesoInception_DF.h5"),
        (MesoInception4(), "MesoInception_F2F.h5"),
    ]
    for module, filename in cases:
        state = keras_state_dict(shared_dir / "weights/mesonet" / filename, module.KERAS_LAYERS)
        expected = {
            k: tuple(v.shape)
            for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        assert {k: tuple(v.shape) for k, v in state.items()} == expected


@pytest.mark.shared
@pytest.mark.parametrize("name", ["meso4_df", "mesoinception4_df"])
def test_port_reproduces_reference_scores(shared_dir: Path, name: str) -> None:
    # DATA.md: Meso4_DF gives fake scores of about 0.96 on df*.jpg and 0.01 on real*.jpg.
    media = shared_dir / "media/dev"
    fakes = sorted(media.glob("fake/df*.jpg"))
    reals = sorted(media.glob("real/real*.jpg"))
    assert len(fakes) == 2 and len(reals) == 2
    model = ModelStore(shared_dir / "weights").load_torch(name)
    with torch.no_grad():
        fake_scores = model(_faces(fakes))
        real_scores = model(_faces(reals))
    assert bool((fake_scores > 0.9).all()), fake_scores
    assert bool((real_scores < 0.1).all()), real_scores


@pytest.mark.shared
@pytest.mark.parametrize(
    "name", ["meso4_df", "meso4_f2f", "mesoinception4_df", "mesoinception4_f2f"]
)
def test_onnx_runtime_matches_torch(shared_dir: Path, tmp_path: Path, name: str) -> None:
    store = ModelStore(shared_dir / "weights", cache_dir=tmp_path)
    model = store.load_torch(name)
    session = ort.InferenceSession(str(store.onnx_path(name)), providers=["CPUExecutionProvider"])
    images = _faces(sorted((shared_dir / "media/dev").glob("*/*.jpg")))
    noise = torch.rand(8, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    for batch in (images, noise):
        with torch.no_grad():
            expected = model(batch).numpy()
        (actual,) = session.run(["score"], {"input": batch.numpy()})
        assert actual.shape == expected.shape == (len(batch),)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
