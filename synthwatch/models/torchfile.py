"""Read PyTorch checkpoint files (state dicts) into numpy arrays, without importing torch.

The scan image runs its nets on ONNX Runtime and numpy and does not install torch, yet
the third-party weights arrive as `torch.save` files. This module reads them directly.
It is also the safer reader: `torch.load` is a pickle loader, and a checkpoint is
untrusted input. Here, like torch's `weights_only=True`, the unpickler resolves only the
globals a state dict needs (`collections.OrderedDict`, torch's tensor and parameter
rebuild functions and its storage classes); any other global (`os.system`,
`builtins.eval`) is refused before it is called, as `ModelUnavailable` naming the file
and the global.

The two on-disk formats, from torch's `serialization.py`:

- zip (torch >= 1.6, starts with ``PK\\x03\\x04``): every record sits under one top
  directory (`archive/`, or the file's stem). `<dir>/data.pkl` is the object pickle; each
  tensor storage is a persistent id ``('storage', storage_type, key, location, numel)``
  whose bytes are the record `<dir>/data/<key>`. `<dir>/byteorder` says 'little' or 'big'
  (absent: little) and applies to every storage.
- legacy (older torch, or `_use_new_zipfile_serialization=False`): five things in a row
  in one file: the pickled magic number 0x1950a86a20f9469cfc6c, the protocol version 1001,
  a sys_info dict, the object pickle, whose storage persistent ids are
  ``('storage', storage_type, root_key, location, numel, view_metadata)``, and a pickled
  list of storage keys. Then, for each key in that order, an 8-byte little-endian element
  count and the storage's bytes, always little-endian. `view_metadata` is None except in
  files of very old torch, where it is ``(view_key, offset, size)``: a slice of the root.

A tensor is ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``: numpy's
`as_strided` over the storage, after checking that the last element it reaches lies
inside the storage, so a hostile offset or stride cannot read outside it. Every array
returned is a C-contiguous copy that owns its memory, of the storage's dtype (bfloat16
through `ml_dtypes`, which onnx already requires; booleans normalised to 0/1).

A state dict maps str keys to tensors only. A file whose top-level object is anything
else, or whose dict holds a non-tensor value (an int epoch, a nested dict), is refused as
not a state dict rather than read in part; `OrderedDict._metadata` (module versions) is
ignored. A truncated or corrupt file is `ModelUnavailable` too, and so is one whose
tensors would add up to more than `_AMPLIFICATION` times the file's size: a stride of 0
lets a few bytes of storage stand for an arbitrarily large tensor.
"""

from __future__ import annotations

import io
import math
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from synthwatch.errors import ModelUnavailable

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# The decoded tensors may take at most this many times the file's size, plus _SLACK: a
# real state dict is about its file's size (more only when tensors share storage).
_AMPLIFICATION = 16
_SLACK = 64 << 20

# torch's storage classes (`torch.<Name>`) and the dtype of their elements; "bfloat16"
# resolves through ml_dtypes. Quantized storages are not supported.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _Corrupt(Exception):
    """The file is not a readable state dict; turned into `ModelUnavailable` with its path."""


class _StorageType(NamedTuple):
    """What the unpickler hands out for a global such as `torch.FloatStorage`."""

    name: str
    dtype: str


class _Storage(NamedTuple):
    """A storage a tensor points into: `numel` elements of `dtype` starting `offset`
    elements into the record or root storage `key` (the offset is nonzero only for the
    storage views of very old legacy files)."""

    key: str
    dtype: str
    numel: int
    offset: int


class _Tensor(NamedTuple):
    """A tensor as the pickle describes it; materialised after unpickling."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def read_state_dict(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Tensors of a torch state-dict file by key, as numpy arrays (C-contiguous copies,
    correct dtype and shape).

    Reads both the zip format of torch >= 1.6 and the legacy format. Raises
    `ModelUnavailable` if the file cannot be read, is truncated or corrupt, references a
    global outside the allow-list, or is not a dict of str keys to tensors.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelUnavailable(f"{path}: cannot read torch checkpoint ({exc})") from exc
    budget = _AMPLIFICATION * len(data) + _SLACK
    try:
        if data.startswith(_ZIP_MAGIC):
            return _read_zip(path, data, budget)
        if data[:1] == pickle.PROTO:
            return _read_legacy(path, data, budget)
    except ModelUnavailable:
        raise
    except _Corrupt as exc:
        raise ModelUnavailable(f"{path}: not a readable torch state dict: {exc}") from exc
    except Exception as exc:  # a hostile or broken pickle can raise nearly anything
        raise ModelUnavailable(
            f"{path}: corrupt torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if data[257:262] == b"ustar":
        raise ModelUnavailable(f"{path}: the tar format of torch < 0.4 is not supported")
    raise ModelUnavailable(f"{path}: not a torch checkpoint (neither zip nor legacy pickle)")


class _Unpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals of a state dict and hands every
    storage persistent id to `storage`."""

    def __init__(
        self, file: io.BytesIO, path: Path, storage: Callable[[tuple[Any, ...]], _Storage]
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storage = storage

    def find_class(self, module: str, name: str, /) -> Any:
        """The allowed global `module.name`; raises `ModelUnavailable` for any other."""
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in _REBUILDERS:
            return _REBUILDERS[name]
        if (module == "torch" or (module, name) == ("torch.storage", "UntypedStorage")) and (
            name in _STORAGE_DTYPES
        ):
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise ModelUnavailable(
            f"{self._path}: refused global {module}.{name} in torch checkpoint "
            "(a state dict holds only tensors and OrderedDict)"
        )

    def persistent_load(self, pid: Any) -> Any:
        """The storage a persistent id stands for."""
        if not isinstance(pid, tuple) or not pid:
            raise _Corrupt(f"unexpected persistent id {pid!r:.80}")
        kind = _text(pid[0])
        if kind == "module":
            raise _Corrupt("it pickles an nn.Module, not a state dict")
        if kind != "storage":
            raise _Corrupt(f"unexpected persistent id kind {kind!r:.40}")
        return self._storage(pid)


def _text(value: object) -> str:
    """A str the pickle holds as str or (from Python 2) ASCII bytes."""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if isinstance(value, str):
        return value
    raise _Corrupt(f"expected a string, got {type(value).__name__}")


def _count(value: object, what: str) -> int:
    """A non-negative int (not a bool)."""
    if type(value) is not int or value < 0:
        raise _Corrupt(f"{what} is not a non-negative integer: {value!r:.40}")
    return value


def _dims(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise _Corrupt(f"tensor {what} is not a tuple: {value!r:.40}")
    return tuple(_count(v, f"tensor {what}") for v in value)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _Tensor:
    """`torch._utils._rebuild_tensor`: checks that the view lies inside its storage."""
    if not isinstance(storage, _Storage):
        raise _Corrupt(f"tensor over {type(storage).__name__}, not a storage")
    start = _count(offset, "storage offset")
    shape = _dims(size, "size")
    strides = _dims(stride, "stride")
    if len(shape) != len(strides):
        raise _Corrupt(f"tensor size {shape} and stride {strides} differ in length")
    if all(shape):  # an empty tensor reads nothing
        last = start + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise _Corrupt(
                f"tensor (offset {start}, size {shape}, stride {strides}) reaches element "
                f"{last} of a storage of {storage.numel}"
            )
    return _Tensor(storage, start, shape, strides)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> _Tensor:
    """`torch._utils._rebuild_tensor_v2`; requires_grad and hooks do not matter here."""
    if metadata:  # conj/neg bits would change the values
        raise _Corrupt(f"tensor metadata {metadata!r:.80} is not supported")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> _Tensor:
    """`torch._utils._rebuild_parameter`: an nn.Parameter is its tensor."""
    if not isinstance(data, _Tensor):
        raise _Corrupt(f"parameter over {type(data).__name__}, not a tensor")
    return data


_REBUILDERS: dict[str, Callable[..., _Tensor]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
}


class _Roots:
    """The root storages the pickle references: key -> (dtype, numel) of the first
    reference. Later references may reinterpret the bytes under another dtype (torch
    allows that for storages with no data) but must agree on their length."""

    def __init__(self) -> None:
        self.declared: dict[str, tuple[str, int]] = {}

    def add(self, storage_type: object, key: object, location: object, numel: object) -> str:
        if not isinstance(storage_type, _StorageType):
            raise _Corrupt(f"storage type {storage_type!r:.60} is not a torch storage class")
        if not isinstance(key, str):
            raise _Corrupt(f"storage key {key!r:.40} is not a string")
        _text(location)
        count = _count(numel, "storage size")
        nbytes = count * _dtype(storage_type.dtype).itemsize
        known = self.declared.setdefault(key, (storage_type.dtype, count))
        if known[1] * _dtype(known[0]).itemsize != nbytes:
            raise _Corrupt(f"storage {key} is referenced with two different lengths")
        return key

    def nbytes(self, key: str) -> int:
        dtype, count = self.declared[key]
        return count * _dtype(dtype).itemsize


def _dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of `_STORAGE_DTYPES` name, in native byte order."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:  # onnx requires it, so it is normally there
            raise _Corrupt("bfloat16 tensors need the ml_dtypes package") from exc
        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


def _unpickle_state(unpickler: _Unpickler) -> dict[str, _Tensor]:
    """Load the object pickle and check that it is a state dict."""
    obj = unpickler.load()
    if type(obj) not in (dict, OrderedDict):
        raise _Corrupt(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    state: dict[str, _Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _Corrupt(f"state dict key {key!r:.60} is not a string")
        if not isinstance(value, _Tensor):
            raise _Corrupt(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor "
                "(a full training checkpoint? pass its state dict)"
            )
        state[key] = value
    return state


def _read_zip(path: Path, data: bytes, budget: int) -> dict[str, npt.NDArray[Any]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise _Corrupt(f"broken zip archive ({exc})") from exc
    with archive:
        names = archive.namelist()
        if not names or "/" not in names[0]:
            raise _Corrupt("zip archive without torch's top directory")
        top = names[0].split("/", 1)[0]

        def record(name: str, expected: int | None = None) -> bytes:
            try:
                info = archive.getinfo(f"{top}/{name}")
            except KeyError:
                raise _Corrupt(f"record {top}/{name} is missing") from None
            if expected is not None and info.file_size != expected:
                raise _Corrupt(
                    f"record {top}/{name} holds {info.file_size} bytes, expected {expected}"
                )
            if info.file_size > budget:
                raise _Corrupt(f"record {top}/{name} is too large ({info.file_size} bytes)")
            return archive.read(info)

        order = "little"
        if f"{top}/byteorder" in names:
            raw_order = record("byteorder")
            if raw_order not in (b"little", b"big"):
                raise _Corrupt(f"unknown byteorder {raw_order[:20]!r}")
            order = raw_order.decode()

        roots = _Roots()

        def storage(pid: tuple[Any, ...]) -> _Storage:
            if len(pid) != 5:
                raise _Corrupt(f"storage persistent id of {len(pid)} fields, expected 5")
            _, storage_type, key, location, numel = pid
            key = roots.add(storage_type, key, location, numel)
            return _Storage(key, storage_type.dtype, numel, 0)

        pickled = record("data.pkl")
        state = _unpickle_state(_Unpickler(io.BytesIO(pickled), path, storage))
        _check_budget(state, roots, budget)
        raw = {key: record(f"data/{key}", roots.nbytes(key)) for key in roots.declared}
    return _materialise(state, raw, swap=order != sys.byteorder)


def _read_legacy(path: Path, data: bytes, budget: int) -> dict[str, npt.NDArray[Any]]:
    stream = io.BytesIO(data)

    def no_storage(pid: tuple[Any, ...]) -> _Storage:
        raise _Corrupt("storage in the checkpoint header")

    header = _Unpickler(stream, path, no_storage)
    if header.load() != _LEGACY_MAGIC:
        raise _Corrupt("no torch magic number (a plain pickle, or a legacy tar checkpoint?)")
    version = header.load()
    if version != _LEGACY_PROTOCOL:
        raise _Corrupt(f"legacy protocol version {version!r:.20}, expected {_LEGACY_PROTOCOL}")
    if not isinstance(header.load(), dict):
        raise _Corrupt("legacy sys_info is not a dict")

    roots = _Roots()

    def storage(pid: tuple[Any, ...]) -> _Storage:
        if len(pid) != 6:
            raise _Corrupt(f"storage persistent id of {len(pid)} fields, expected 6")
        _, storage_type, root_key, location, numel, view = pid
        key = roots.add(storage_type, root_key, location, numel)
        if view is None:
            return _Storage(key, storage_type.dtype, numel, 0)
        if not isinstance(view, tuple) or len(view) != 3:
            raise _Corrupt(f"storage view metadata {view!r:.60} is not (key, offset, size)")
        offset = _count(view[1], "storage view offset")
        size = _count(view[2], "storage view size")
        if offset + size > numel:
            raise _Corrupt(f"storage view [{offset}, {offset + size}) outside {numel} elements")
        return _Storage(key, storage_type.dtype, size, offset)

    state = _unpickle_state(_Unpickler(stream, path, storage))
    keys = _Unpickler(stream, path, no_storage).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Corrupt("the storage key list is not a list of strings")
    if missing := set(roots.declared) - set(keys):
        raise _Corrupt(f"storages {sorted(missing)[:3]} are referenced but not stored")
    _check_budget(state, roots, budget)

    view = memoryview(data)
    pos = stream.tell()
    raw: dict[str, memoryview] = {}
    for key in keys:
        if len(data) < pos + 8:
            raise _Corrupt(f"truncated before storage {key}")
        count = int.from_bytes(view[pos : pos + 8], "little")
        pos += 8
        if key not in roots.declared:
            raise _Corrupt(f"storage {key} is stored but never referenced")
        numel = roots.declared[key][1]
        if count != numel:
            raise _Corrupt(f"storage {key} holds {count} elements, the pickle says {numel}")
        nbytes = roots.nbytes(key)
        if len(data) < pos + nbytes:
            raise _Corrupt(f"truncated inside storage {key}")
        raw[key] = view[pos : pos + nbytes]
        pos += nbytes
    return _materialise(state, raw, swap=sys.byteorder != "little")


def _check_budget(state: dict[str, _Tensor], roots: _Roots, budget: int) -> None:
    """Refuse before allocating when storages or tensors would exceed the budget."""
    stored = sum(roots.nbytes(key) for key in roots.declared)
    decoded = sum(math.prod(t.size) * _dtype(t.storage.dtype).itemsize for t in state.values())
    if max(stored, decoded) > budget:
        raise _Corrupt(
            f"its tensors would take {max(stored, decoded)} bytes, more than "
            f"{_AMPLIFICATION}x the file's size"
        )


def _materialise(
    state: dict[str, _Tensor], raw: dict[str, bytes] | dict[str, memoryview], *, swap: bool
) -> dict[str, npt.NDArray[Any]]:
    """Copy each tensor out of its storage bytes (swapping byte order if `swap`)."""
    decoded: dict[_Storage, npt.NDArray[Any]] = {}
    out: dict[str, npt.NDArray[Any]] = {}
    for name, tensor in state.items():
        storage = tensor.storage
        dtype = _dtype(storage.dtype)
        if not all(tensor.size):
            out[name] = np.zeros(tensor.size, dtype=dtype)
            continue
        flat = decoded.get(storage)
        if flat is None:
            flat = _decode(raw[storage.key], storage, dtype, swap=swap)
            decoded[storage] = flat
        item = dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[tensor.offset :],
            shape=tensor.size,
            strides=tuple(s * item for s in tensor.stride),
            writeable=False,
        )
        out[name] = np.array(view, dtype=dtype, order="C", copy=True)
    return out


def _decode(
    raw: bytes | memoryview, storage: _Storage, dtype: np.dtype[Any], *, swap: bool
) -> npt.NDArray[Any]:
    """The elements of `storage` as a flat read-only array in native byte order."""
    item = dtype.itemsize
    start = storage.offset * item
    chunk = raw[start : start + storage.numel * item]
    if len(chunk) != storage.numel * item:  # checked when read; kept as the last guard
        raise _Corrupt(f"storage {storage.key} is shorter than its tensors")
    if dtype == np.bool_:
        flags: npt.NDArray[np.bool_] = np.frombuffer(chunk, dtype=np.uint8) != 0
        return flags
    if swap and item > 1:
        # Swap each scalar: a complex number is two floats, bfloat16 one 2-byte word.
        word = item // 2 if dtype.kind == "c" else item
        words = np.frombuffer(chunk, dtype=np.dtype(f"u{word}"))
        return words.byteswap().view(dtype)
    return np.frombuffer(chunk, dtype=dtype)
