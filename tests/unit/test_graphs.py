"""The shipped ONNX graph templates: they carry no weights, bind strictly, score exactly
as the torch modules they were exported from, and are not stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from synthwatch.errors import ModelUnavailable
from synthwatch.models import graphs
from synthwatch.models.registry import SPECS, ModelStore

TEMPLATES = sorted({g.name for spec in SPECS for g in spec.graphs})


def _store(shared_dir: Path | None, tmp_path: Path) -> ModelStore:
    return ModelStore(
        shared_dir / "weights" if shared_dir else tmp_path / "none", cache_dir=tmp_path / "c"
    )


def _spec_store(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> ModelStore:
    """A store holding `name`'s weights: bundled ones anywhere, third-party ones from
    ../shared (skipped when it is absent)."""
    store = _store(None, tmp_path)
    if store.available(name):
        return store
    shared: Path = request.getfixturevalue("shared_dir")
    store = _store(shared, tmp_path)
    if not store.available(name):
        pytest.skip(f"{name}: weights not installed")
    return store


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_ship_no_weight_values(name: str) -> None:
    # Only constants of our code may have values (the scene probe's ImageNet mean and
    # standard deviation, 6 floats); every learned parameter is an empty slot.
    model = onnx.load(str(graphs.template_path(name)))
    filled = [i for i in model.graph.initializer if not graphs.is_empty(i)]
    assert sum(len(i.raw_data) for i in filled) <= 64
    slots = [i for i in model.graph.initializer if graphs.is_empty(i)]
    assert slots, "a template with no parameter slots binds nothing"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bound_graphs_score_as_the_torch_modules(
    spec: object, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import torch

    name = spec.name  # type: ignore[attr-defined]
    store = _spec_store(name, request, tmp_path)
    models = store.onnx_models(name)
    modules = store.torch_modules(name)
    rng = np.random.default_rng(0)
    for graph, model, module in zip(store.spec(name).graphs, models, modules, strict=True):
        shape = (3, 3, 37, 53) if graph.dynamic_hw else (3, *graph.input_shape)
        x = rng.random(shape, dtype=np.float32)
        if store.spec(name).kind == "audio":
            x = (x - 0.5) * 0.2  # a quiet waveform, not a square wave at full scale
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        outs = session.run(None, {"input": x})
        assert [o.name for o in session.get_outputs()] == list(graph.outputs)
        with torch.inference_mode():
            ref = module(torch.from_numpy(x))
        refs = ref if isinstance(ref, tuple) else (ref,)
        for out, expected in zip(outs, refs, strict=True):
            np.testing.assert_allclose(out, expected.numpy().reshape(out.shape), atol=1e-4)


def _bundled_state() -> dict[str, np.ndarray]:
    store = ModelStore(Path("/nonexistent"))
    (state,) = store.spec("fingerprint").state(store.resolve("fingerprint"))
    return dict(state)


def test_bind_refuses_a_missing_parameter_naming_it() -> None:
    state = _bundled_state()
    key = sorted(state)[0]
    del state[key]
    with pytest.raises(ModelUnavailable, match=f"missing {key}"):
        graphs.bind("fingerprint", state, what="w.pt")


def test_bind_refuses_a_wrong_shape_and_an_unexpected_key() -> None:
    state = _bundled_state()
    key = sorted(state)[0]
    state[key] = np.zeros((*state[key].shape, 2), dtype=np.float32)
    state["head.extra.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ModelUnavailable) as err:
        graphs.bind("fingerprint", state, what="w.pt")
    assert key in str(err.value) and "graph expects" in str(err.value)
    assert "unexpected head.extra.weight" in str(err.value)


def test_weights_of_another_architecture_do_not_bind() -> None:
    with pytest.raises(ModelUnavailable, match="weights do not fit SbiFaceNet"):
        graphs.bind("sbi_face", _bundled_state(), what="fingerprint.pt")


@pytest.mark.parametrize("name", ["sbi_face", "fingerprint", "scene_probe"])
def test_templates_match_a_fresh_export(name: str, tmp_path: Path) -> None:
    """A changed architecture without `python -m synthwatch.models.export` fails here."""
    from synthwatch.models.export import export_template

    store = _store(None, tmp_path)
    if not store.available(name):
        pytest.skip(f"{name}: weights not installed")
    spec = store.spec(name)
    (graph,) = spec.graphs
    (state,) = spec.state(store.resolve(name))
    (module,) = store.torch_modules(name)
    fresh = export_template(
        module, graph.name, (1, *graph.input_shape), state, dest=tmp_path / "fresh.onnx"
    )
    a, b = onnx.load(str(fresh)), onnx.load(str(graphs.template_path(name)))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert {(i.name, tuple(i.dims)) for i in a.graph.initializer} == {
        (i.name, tuple(i.dims)) for i in b.graph.initializer
    }
    assert a.metadata_props == b.metadata_props
