"""The model store: verified weights, atomic import and pull, cached ONNX exports."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models import registry
from synthwatch.models.registry import SPECS, ModelSpec, ModelStore, WeightsFile, index_specs

PAYLOAD = b"synthwatch test weights\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Tiny(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.mean(dim=(1, 2, 3)))


def _spec(url: str = "http://127.0.0.1:9/none", builds: list[int] | None = None) -> ModelSpec:
    def build(paths: Sequence[Path]) -> tuple[nn.Module, ...]:
        return (_Tiny(),)

    def state(paths: Sequence[Path]) -> tuple[registry.State, ...]:
        # Stand-in weights for the fake file: the bundled fingerprint net's, bound
        # into its shipped graph.
        if builds is not None:
            builds.append(1)
        bundled = ModelStore(Path("/nonexistent"))
        return bundled.spec("fingerprint").state(bundled.resolve("fingerprint"))

    return ModelSpec(
        name="fake_df",
        version="1",
        kind="face",
        files=(WeightsFile("fake/model.bin", SHA, len(PAYLOAD), url),),
        source="test",
        licence="test",
        input_shape=(3, 8, 8),
        preprocessing="none",
        output="synthetic score in [0,1]",
        graphs=(registry.Graph("fingerprint", (3, 64, 64)),),
        state=state,
        builder=build,
    )


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server answering GET /<name> with routes[name], 404 otherwise."""
    routes: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the test server's access log out of the test output."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy set in the environment must not intercept 127.0.0.1.
    with httpx.Client(trust_env=False, timeout=10) as c:
        yield c


def test_missing_weights_error_names_expected_path_and_fix(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, specs=[_spec()])
    with pytest.raises(ModelUnavailable) as info:
        store.resolve("fake_df")
    message = str(info.value)
    assert str(tmp_path / "fake/model.bin") in message
    assert "synthwatch models import FILE" in message
    assert "synthwatch models pull fake_df" in message
    assert "\n" not in message
    assert [s.state for s in store.list()] == ["missing"]


def test_corrupted_weights_are_refused_with_sha_prefixes(tmp_path: Path) -> None:
    target = tmp_path / "fake/model.bin"
    target.parent.mkdir()
    target.write_bytes(PAYLOAD[:-1] + b"X")
    store = ModelStore(tmp_path, specs=[_spec()])
    with pytest.raises(ModelUnavailable, match="does not match") as info:
        store.resolve("fake_df")
    assert SHA[:16] in str(info.value)
    assert hashlib.sha256(target.read_bytes()).hexdigest()[:16] in str(info.value)
    assert [s.state for s in store.list()] == ["mismatch"]


def test_unknown_model_name_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="unknown model 'nope'"):
        ModelStore(tmp_path, specs=[_spec()]).resolve("nope")


def test_import_file_places_registered_bytes(tmp_path: Path) -> None:
    src = tmp_path / "download.bin"
    src.write_bytes(PAYLOAD)
    store = ModelStore(tmp_path / "models", specs=[_spec()])

    assert store.import_file(src).name == "fake_df"
    (path,) = store.resolve("fake_df")
    assert path == tmp_path / "models/fake/model.bin"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path / "models") == ["model.bin"]
    assert [s.state for s in store.list()] == ["present"]


def test_import_file_refuses_unknown_bytes(tmp_path: Path) -> None:
    src = tmp_path / "other.bin"
    src.write_bytes(b"not weights")
    store = ModelStore(tmp_path / "models", specs=[_spec()])
    with pytest.raises(ModelUnavailable, match="not a registered weights file"):
        store.import_file(src)
    assert not (tmp_path / "models").exists()


def test_repeated_resolve_does_not_rehash_until_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(PAYLOAD)
    store = ModelStore(tmp_path / "models", specs=[_spec()])
    store.import_file(src)
    (path,) = store.resolve("fake_df")
    calls: list[Path] = []
    real = registry.file_sha256

    def counting(p: Path) -> str:
        calls.append(p)
        return real(p)

    monkeypatch.setattr(registry, "file_sha256", counting)

    for _ in range(5):
        store.resolve("fake_df")
    assert calls == []

    path.write_bytes(PAYLOAD[:-1] + b"X")
    os.utime(path, ns=(1, 1))
    with pytest.raises(ModelUnavailable, match="does not match"):
        store.resolve("fake_df")
    assert calls == [path]


def test_pull_downloads_and_verifies(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], client: httpx.Client
) -> None:
    base, routes = server
    routes["model.bin"] = PAYLOAD
    store = ModelStore(tmp_path, specs=[_spec(f"{base}/model.bin")])

    (path,) = store.pull("fake_df", client=client)
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["model.bin"]


@pytest.mark.parametrize(
    "body",
    [PAYLOAD[:-1] + b"X", PAYLOAD[:100], PAYLOAD + b"extra"],
    ids=["tampered", "truncated", "oversized"],
)
def test_pull_refuses_wrong_bytes_and_leaves_nothing(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], client: httpx.Client, body: bytes
) -> None:
    base, routes = server
    routes["model.bin"] = body
    store = ModelStore(tmp_path, specs=[_spec(f"{base}/model.bin")])

    with pytest.raises(ModelUnavailable, match="refused"):
        store.pull("fake_df", client=client)
    assert _leftovers(tmp_path) == []


def test_pull_reports_http_errors(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], client: httpx.Client
) -> None:
    base, _ = server
    store = ModelStore(tmp_path, specs=[_spec(f"{base}/gone.bin")])
    with pytest.raises(ModelUnavailable, match="HTTP 404"):
        store.pull("fake_df", client=client)
    assert _leftovers(tmp_path) == []


def test_onnx_export_is_cached_outside_model_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "fake").mkdir(parents=True)
    (models / "fake/model.bin").write_bytes(PAYLOAD)
    builds: list[int] = []
    store = ModelStore(models, specs=[_spec(builds=builds)], cache_dir=tmp_path / "cache")

    first = store.onnx_path("fake_df")
    assert first.parent == tmp_path / "cache"
    assert first.name.startswith(f"fake_df-v1-{SHA[:16]}")
    mtime = first.stat().st_mtime_ns
    assert store.onnx_path("fake_df") == first
    assert first.stat().st_mtime_ns == mtime
    assert len(builds) == 1
    assert _leftovers(tmp_path / "cache") == [first.name]
    assert _leftovers(models) == ["model.bin"]


def test_model_set_version_is_order_free_and_tracks_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a = store.model_set_version(["meso4_df", "mtcnn"])
    assert a == store.model_set_version(["mtcnn", "meso4_df", "mtcnn"])
    assert a != store.model_set_version(["meso4_f2f", "mtcnn"])
    assert len(a) == 16

    spec = _spec()
    retrained = replace(spec, files=(replace(spec.files[0], sha256="0" * 64),))
    before = ModelStore(tmp_path, specs=[spec]).model_set_version(["fake_df"])
    after = ModelStore(tmp_path, specs=[retrained]).model_set_version(["fake_df"])
    assert before != after


def test_duplicate_registry_name_raises() -> None:
    with pytest.raises(ValueError, match="duplicate model name"):
        index_specs([_spec(), _spec()])


def test_builtin_registry_is_consistent() -> None:
    specs = index_specs(SPECS)
    assert {"meso4_df", "meso4_f2f", "mtcnn"} <= specs.keys()
    assert specs["meso4_df"].files[0].path == "mesonet/Meso4_DF.h5"
    for spec in SPECS:
        for f in spec.files:
            assert len(f.sha256) == 64 and not Path(f.path).is_absolute()
        if spec.kind == "face":
            assert spec.output.startswith("synthetic score in [0,1]")


@pytest.mark.shared
def test_shared_weights_verify_against_registry(shared_dir: Path) -> None:
    store = ModelStore(shared_dir / "weights")
    assert {s.name: s.state for s in store.list()} == {s.name: "present" for s in SPECS}


@pytest.mark.parametrize("name", ["sbi_face", "fingerprint"])
def test_our_own_models_ship_inside_the_package_and_run_without_a_model_dir(
    tmp_path: Path, name: str
) -> None:
    import onnxruntime as ort
    import torch

    store = ModelStore(tmp_path / "empty", cache_dir=tmp_path / "cache")
    spec = store.spec(name)
    assert spec.files[0].bundled and store.available(name)
    module = store.load_torch(name)
    batch = torch.rand(3, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(batch).numpy()
    session = ort.InferenceSession(str(store.onnx_path(name)), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["score"], {"input": batch.numpy()})
    assert actual.shape == (3,) and ((actual >= 0) & (actual <= 1)).all()
    assert abs(actual - expected).max() < 1e-4
    # Bundled weights are not the model dir's business: nothing to import or pull.
    with pytest.raises(ModelUnavailable, match="bundled weights, which ship with synthwatch"):
        store.import_file(store.resolve(name)[0])
    assert not (tmp_path / "empty").exists()
