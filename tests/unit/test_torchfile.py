"""torchfile reads torch.save files of both formats exactly like torch.load, without torch,
and refuses hostile, truncated and non-state-dict files with ModelUnavailable."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from synthwatch.errors import ModelUnavailable
from synthwatch.models.torchfile import read_state_dict

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "synthwatch" / "models" / "weights"
FORMATS = {"zip": True, "legacy": False}


def _save(sd: Any, path: Path, fmt: str) -> Path:
    torch.save(sd, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _assert_same(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        array = got[key]
        expected = _as_numpy(tensor.detach())
        if tensor.dtype == torch.bfloat16:
            assert array.dtype.name == "bfloat16"
            array = array.astype(np.float32)
        assert array.dtype == expected.dtype, key
        assert array.shape == expected.shape, key
        assert array.flags.c_contiguous and array.flags.owndata and array.flags.writeable, key
        np.testing.assert_array_equal(array, expected, err_msg=key)


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 5, generator=g)
    flat = torch.arange(20, dtype=torch.int64)
    sd: dict[str, torch.Tensor] = OrderedDict()
    sd["f32"] = torch.randn(3, 4, generator=g)
    sd["f64"] = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    sd["f16"] = torch.randn(7, generator=g).half()
    sd["bf16"] = torch.randn(2, 5, generator=g).bfloat16()
    sd["c64"] = torch.randn(3, generator=g, dtype=torch.complex64)
    sd["i64"] = torch.randint(-(2**40), 2**40, (4, 2), generator=g)
    sd["i32"] = torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32)
    sd["i16"] = torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int16)
    sd["i8"] = torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8)
    sd["u8"] = torch.randint(0, 256, (2, 8), generator=g, dtype=torch.uint8)
    sd["bool"] = torch.rand(9, generator=g) > 0.5
    sd["scalar"] = torch.tensor(3.5)
    sd["scalar_int"] = torch.tensor(7, dtype=torch.int64)
    sd["empty"] = torch.zeros(0, 3)
    # Views: all of these share `base`'s or `flat`'s storage in the file.
    sd["base"] = base
    sd["transposed"] = base.t()
    sd["rows"] = base[2:5]
    sd["column"] = base[:, 3]
    sd["every_other"] = flat[3::2]
    sd["window"] = flat[5:17].view(3, 4)[:, 1:3]
    sd["element"] = flat[11]
    sd["expanded"] = torch.tensor([1.0, 2.0]).expand(3, 2)
    return sd


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_matches_torch(tmp_path: Path, fmt: str) -> None:
    sd = _random_state(0)
    path = _save(sd, tmp_path / "sd.pt", fmt)
    assert path.read_bytes().startswith(b"PK\x03\x04" if fmt == "zip" else b"\x80\x02\x8a\x0a")
    got = read_state_dict(path)
    _assert_same(got, torch.load(path, weights_only=True))
    _assert_same(got, sd)
    # Tensors that shared a storage come back as independent copies.
    got["base"][0, 0] = 1000.0
    assert got["transposed"][0, 0] != 1000.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_with_metadata_and_parameters(tmp_path: Path, fmt: str) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = net.state_dict()
    assert hasattr(sd, "_metadata")  # pickled with BUILD onto the OrderedDict
    got = read_state_dict(_save(sd, tmp_path / "net.pt", fmt))
    _assert_same(got, sd)
    assert got["1.num_batches_tracked"].shape == ()
    # A plain dict of nn.Parameter objects goes through _rebuild_parameter.
    params = dict(net.named_parameters())
    _assert_same(read_state_dict(_save(params, tmp_path / "params.pt", fmt)), params)


def test_zip_without_byteorder_record_is_little_endian(tmp_path: Path) -> None:
    """Files of torch < 1.12 have no byteorder record; torch reads them as little-endian."""
    sd = {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}
    full = _save(sd, tmp_path / "full.pt", "zip")
    path = tmp_path / "nobom.pt"
    with zipfile.ZipFile(full) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/byteorder"):
                dst.writestr(info, src.read(info))
    assert len(zipfile.ZipFile(path).namelist()) == len(zipfile.ZipFile(full).namelist()) - 1
    _assert_same(read_state_dict(path), sd)


def test_reader_needs_no_torch(tmp_path: Path) -> None:
    path = _save({"w": torch.arange(4.0)}, tmp_path / "w.pt", "zip")
    legacy = _save({"w": torch.arange(4.0)}, tmp_path / "w_legacy.pt", "legacy")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from synthwatch.models.torchfile import read_state_dict\n"
        f"for p in ({str(path)!r}, {str(legacy)!r}):\n"
        "    assert read_state_dict(Path(p))['w'].tolist() == [0.0, 1.0, 2.0, 3.0]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- real checkpoints ------------------------------------------------------------------


def _compare_with_torch(path: Path) -> None:
    got = read_state_dict(path)
    want = torch.load(path, weights_only=True, map_location="cpu")
    assert got, path
    _assert_same(got, want)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("relpath", "fmt"),
    [
        ("weights/mtcnn/pnet.pt", "legacy"),
        ("weights/mtcnn/rnet.pt", "legacy"),
        ("weights/mtcnn/onet.pt", "legacy"),
        ("weights/aasist/AASIST.pth", "zip"),
        ("weights/aasist/AASIST-L.pth", "zip"),
    ],
)
def test_shared_weights_match_torch_load(shared_dir: Path, relpath: str, fmt: str) -> None:
    path = shared_dir / relpath
    assert (path.read_bytes()[:4] == b"PK\x03\x04") == (fmt == "zip")
    _compare_with_torch(path)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("sbi_face.pt", "zip"),
        ("fingerprint.pt", "zip"),
        ("scene_probe.pt", "zip"),
        # torchvision's ImageNet MobileNetV2 (fetched by `make install`): legacy format.
        ("mobilenet_v2-b0353104.pth", "legacy"),
    ],
)
def test_bundled_weights_match_torch_load(name: str, fmt: str) -> None:
    path = BUNDLED / name
    if not path.exists():
        pytest.skip(f"{path} not fetched (make install)")
    assert (path.read_bytes()[:4] == b"PK\x03\x04") == (fmt == "zip")
    _compare_with_torch(path)


# --- hand-made files: hostile, corrupt, unusual --------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}


class _Storage:
    """Pickles as the persistent id `pid`, as torch's pickler writes a storage."""

    def __init__(self, *pid: Any) -> None:
        self.pid = ("storage", *pid)


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Call:
    """Pickles as a call of `func(*args)`: what a hostile checkpoint would contain."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None


def _pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _write_zip(
    path: Path, obj: Any, records: dict[str, bytes], byteorder: bytes = b"little"
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _pickle(obj))
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def _write_legacy(
    path: Path, obj: Any, storages: dict[str, tuple[int, bytes]], header: Any = LEGACY_MAGIC
) -> Path:
    buf = io.BytesIO()
    for item in (header, 1001, SYS_INFO):
        pickle.dump(item, buf, protocol=2)
    buf.write(_pickle(obj))
    pickle.dump(sorted(storages), buf, protocol=2)
    for key in sorted(storages):
        count, data = storages[key]
        buf.write(count.to_bytes(8, "little") + data)
    path.write_bytes(buf.getvalue())
    return path


def _floats(n: int) -> bytes:
    return np.arange(n, dtype="<f4").tobytes()


def _zip_tensor(path: Path, offset: int, size: Any, stride: Any, numel: int = 6) -> Path:
    storage = _Storage(torch.FloatStorage, "0", "cpu", numel)
    return _write_zip(path, {"t": _Tensor(storage, offset, size, stride)}, {"0": _floats(numel)})


def _hostile_calls(marker: Path) -> list[Any]:
    return [
        _Call(os.system, f"touch {marker}"),
        _Call(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "builtins.eval"])
@pytest.mark.parametrize("where", ["zip", "legacy", "legacy_header", "zip_value"])
def test_hostile_global_is_refused_and_not_run(tmp_path: Path, which: int, where: str) -> None:
    # torch.load(path, weights_only=False) runs each of these files' call.
    marker = tmp_path / "pwned"
    evil = _hostile_calls(marker)[which]
    path = tmp_path / "evil.pt"
    if where == "zip":
        _write_zip(path, evil, {})
    elif where == "zip_value":  # behind a valid tensor, inside the state dict
        storage = _Storage(torch.FloatStorage, "0", "cpu", 2)
        sd = OrderedDict(w=_Tensor(storage, 0, (2,), (1,)), x=evil)
        _write_zip(path, sd, {"0": _floats(2)})
    elif where == "legacy":
        _write_legacy(path, {"x": evil}, {})
    else:
        _write_legacy(path, {}, {}, header=evil)
    with pytest.raises(ModelUnavailable, match="refused global") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    # Protocol 2 names builtins by their Python 2 module, __builtin__.
    assert ("system" if which == 0 else "builtin__.eval") in str(info.value)
    assert not marker.exists()


def test_hand_made_files_read_as_expected(tmp_path: Path) -> None:
    """The writers above produce files the reader accepts, so the refusals below are real."""
    got = read_state_dict(_zip_tensor(tmp_path / "ok.pt", 1, (2, 2), (1, 2)))
    np.testing.assert_array_equal(got["t"], [[1.0, 3.0], [2.0, 4.0]])
    # The highest reachable element is the storage's last: still inside.
    got = read_state_dict(_zip_tensor(tmp_path / "edge.pt", 3, (3,), (1,)))
    np.testing.assert_array_equal(got["t"], [3.0, 4.0, 5.0])


def test_big_endian_storages_are_swapped(tmp_path: Path) -> None:
    values = np.array([1.5, -2.25, 3.0e30], dtype=np.float32)
    halves = np.array([0.5, 65504.0], dtype=np.float16)
    complexes = np.array([1 + 2j, -3.5j], dtype=np.complex64)
    flags = np.array([True, False, True])
    sd = {
        "f32": _Tensor(_Storage(torch.FloatStorage, "0", "cpu", 3), 0, (3,), (1,)),
        "f16": _Tensor(_Storage(torch.HalfStorage, "1", "cpu", 2), 0, (2,), (1,)),
        "c64": _Tensor(_Storage(torch.ComplexFloatStorage, "2", "cpu", 2), 0, (2,), (1,)),
        "bool": _Tensor(_Storage(torch.BoolStorage, "3", "cpu", 3), 0, (3,), (1,)),
    }
    records = {
        "0": values.astype(">f4").tobytes(),
        "1": halves.astype(">f2").tobytes(),
        "2": complexes.astype(">c8").tobytes(),
        "3": flags.tobytes(),
    }
    got = read_state_dict(_write_zip(tmp_path / "be.pt", sd, records, byteorder=b"big"))
    for key, want in {"f32": values, "f16": halves, "c64": complexes, "bool": flags}.items():
        assert got[key].dtype == want.dtype and got[key].dtype.isnative
        np.testing.assert_array_equal(got[key], want)


def test_legacy_storage_view(tmp_path: Path) -> None:
    """Files of very old torch describe a storage as a slice of a root storage."""
    view = _Storage(torch.FloatStorage, "root", "cpu", 6, ("view", 2, 3))
    path = _write_legacy(
        tmp_path / "v.pt", {"t": _Tensor(view, 1, (2,), (1,))}, {"root": (6, _floats(6))}
    )
    np.testing.assert_array_equal(read_state_dict(path)["t"], [3.0, 4.0])
    outside = _Storage(torch.FloatStorage, "root", "cpu", 6, ("view", 4, 3))
    path = _write_legacy(
        tmp_path / "o.pt", {"t": _Tensor(outside, 0, (1,), (1,))}, {"root": (6, _floats(6))}
    )
    with pytest.raises(ModelUnavailable, match="outside"):
        read_state_dict(path)
    # The view bounds the tensor, not the root storage behind it.
    path = _write_legacy(
        tmp_path / "t.pt", {"t": _Tensor(view, 1, (3,), (1,))}, {"root": (6, _floats(6))}
    )
    with pytest.raises(ModelUnavailable, match="reaches element"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("offset", "size", "stride", "match"),
    [
        (4, (3,), (1,), "reaches element"),  # offset + extent past the end
        (0, (2, 2), (1, 5), "reaches element"),  # a stride past the end
        (0, (7,), (1,), "reaches element"),  # more elements than stored
        (0, (2,), (-1,), "non-negative"),  # negative strides do not exist in torch
        (-1, (2,), (1,), "non-negative"),
        (0, (2, 2), (1,), "differ in length"),
        (0, "ab", (1,), "not a tuple"),
        (0, (10**6, 10**6), (0, 0), "more than"),  # a stride of 0 as a memory bomb
    ],
)
def test_tensor_outside_its_storage_is_refused(
    tmp_path: Path, offset: int, size: Any, stride: Any, match: str
) -> None:
    path = _zip_tensor(tmp_path / "oob.pt", offset, size, stride)
    with pytest.raises(ModelUnavailable, match=match):
        read_state_dict(path)


def test_storage_record_of_wrong_length_is_refused(tmp_path: Path) -> None:
    storage = _Storage(torch.FloatStorage, "0", "cpu", 6)
    path = _write_zip(
        tmp_path / "short.pt", {"t": _Tensor(storage, 0, (6,), (1,))}, {"0": _floats(5)}
    )
    with pytest.raises(ModelUnavailable, match="expected 24"):
        read_state_dict(path)
    legacy_storage = _Storage(torch.FloatStorage, "0", "cpu", 6, None)
    legacy = _write_legacy(
        tmp_path / "count.pt",
        {"t": _Tensor(legacy_storage, 0, (6,), (1,))},
        {"0": (5, _floats(6))},
    )
    with pytest.raises(ModelUnavailable, match="holds 5 elements"):
        read_state_dict(legacy)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -1])
def test_truncated_file_is_refused(tmp_path: Path, fmt: str, cut: float) -> None:
    sd = {"a": torch.randn(50, 50), "b": torch.arange(100)}
    data = _save(sd, tmp_path / "full.pt", fmt).read_bytes()
    keep = len(data) - 1 if cut == -1 else int(len(data) * cut)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:keep])
    with pytest.raises(ModelUnavailable) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "obj",
    [
        torch.zeros(3),
        [torch.zeros(3)],
        {"epoch": 3, "w": torch.zeros(3)},
        {"model": {"w": torch.zeros(3)}},
        {1: torch.zeros(3)},
    ],
    ids=["tensor", "list", "int_value", "nested", "int_key"],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_not_a_state_dict_is_refused(tmp_path: Path, obj: Any, fmt: str) -> None:
    path = _save(obj, tmp_path / "x.pt", fmt)
    with pytest.raises(ModelUnavailable, match=r"not a (state dict|tensor|string)"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_module_is_refused(tmp_path: Path, fmt: str) -> None:
    path = _save(torch.nn.Linear(2, 2), tmp_path / "module.pt", fmt)
    with pytest.raises(ModelUnavailable, match=r"refused global torch\.nn"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", pickle.dumps({"w": 1}, protocol=2), b"PK\x03\x04garbage"],
    ids=["empty", "text", "plain_pickle", "bad_zip"],
)
def test_other_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ModelUnavailable, match=str(path)):
        read_state_dict(path)


def test_missing_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="cannot read"):
        read_state_dict(tmp_path / "absent.pt")
