"""Convert Keras 2.x `save_weights` HDF5 files into state dicts of numpy arrays.

Used for the MesoNet weights (DariusAf/MesoNet, Keras 2.1.5). Keras stores, per layer,
a group named after the layer whose `weight_names` attribute lists its datasets in order;
the root's `layer_names` attribute lists the layers. We read those attributes rather than
guessing dataset paths, and map layers to torch modules by kind and creation order (see
`MESO4_LAYERS`), so a file whose layer counters start elsewhere (conv2d_5.. vs
conv2d_1..) still converts. No torch here: the scanner binds these arrays into ONNX
graphs (`synthwatch.models.graphs`); the torch modules load them in `meso.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import numpy.typing as npt

from synthwatch.errors import ModelUnavailable

KerasKind = Literal["conv2d", "batch_normalization", "dense"]
"""Keras layer types that carry weights in these networks."""

KerasLayout = tuple[tuple[KerasKind, str], ...]
"""Weighted layers in Keras creation order, each with the module path it maps to."""

MESO4_LAYERS: KerasLayout = (
    ("conv2d", "block1.conv"),
    ("batch_normalization", "block1.bn"),
    ("conv2d", "block2.conv"),
    ("batch_normalization", "block2.bn"),
    ("conv2d", "block3.conv"),
    ("batch_normalization", "block3.bn"),
    ("conv2d", "block4.conv"),
    ("batch_normalization", "block4.bn"),
    ("dense", "head.fc1"),
    ("dense", "head.fc2"),
)
"""Meso-4's weighted layers in Keras creation order, mapped to the torch module paths
(`synthwatch.models.meso.Meso4`), which are also the ONNX graph's initializer names.

Keras numbers layers by creation, so sorting the file's layers of one kind by their
numeric suffix recovers this order whatever the counters started at.
"""

MESOINCEPTION4_LAYERS: KerasLayout = (
    # Keras creation order inside an inception layer: x1, x2 (1x1, 3x3), x3, x4.
    ("conv2d", "incep1.b1"),
    ("conv2d", "incep1.b2_1"),
    ("conv2d", "incep1.b2_2"),
    ("conv2d", "incep1.b3_1"),
    ("conv2d", "incep1.b3_2"),
    ("conv2d", "incep1.b4_1"),
    ("conv2d", "incep1.b4_2"),
    ("batch_normalization", "incep1.bn"),
    ("conv2d", "incep2.b1"),
    ("conv2d", "incep2.b2_1"),
    ("conv2d", "incep2.b2_2"),
    ("conv2d", "incep2.b3_1"),
    ("conv2d", "incep2.b3_2"),
    ("conv2d", "incep2.b4_1"),
    ("conv2d", "incep2.b4_2"),
    ("batch_normalization", "incep2.bn"),
    ("conv2d", "block3.conv"),
    ("batch_normalization", "block3.bn"),
    ("conv2d", "block4.conv"),
    ("batch_normalization", "block4.bn"),
    ("dense", "head.fc1"),
    ("dense", "head.fc2"),
)
"""MesoInception-4's, as `MESO4_LAYERS`."""

_SUFFIX = re.compile(r"^(?P<kind>.+?)(?:_(?P<n>\d+))?$")


def read_keras_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every weighted layer of a Keras HDF5 weights file: {layer: {"kernel": array, ...}}.

    Raises `ModelUnavailable` if the file is not a Keras weights file.
    """
    try:
        with h5py.File(path, "r") as f:
            # A full `model.save` file nests the same layout under "model_weights".
            root = f.get("model_weights", f)
            if "layer_names" not in root.attrs:
                raise ModelUnavailable(f"{path}: not a Keras weights file (no layer_names)")
            layers: dict[str, dict[str, np.ndarray]] = {}
            for raw_layer in root.attrs["layer_names"]:
                layer = _text(raw_layer)
                group = root[layer]
                weights: dict[str, np.ndarray] = {}
                for raw_weight in group.attrs.get("weight_names", []):
                    weight = _text(raw_weight)
                    # "conv2d_5/kernel:0" -> "kernel"
                    short = weight.rsplit("/", 1)[-1].split(":", 1)[0]
                    weights[short] = np.asarray(group[weight], dtype=np.float32)
                if weights:
                    layers[layer] = weights
            return layers
    except OSError as exc:
        raise ModelUnavailable(f"{path}: cannot read HDF5 weights: {exc}") from exc


def keras_state_dict(
    path: Path, layout: Sequence[tuple[KerasKind, str]]
) -> dict[str, npt.NDArray[np.float32]]:
    """Build a state dict (torch's layout and key names, numpy arrays) from a Keras file.

    `layout` lists the torch module paths of the weighted layers in Keras creation
    order, each with its Keras kind. Layout: conv kernels (kh, kw, in, out) become
    (out, in, kh, kw); dense kernels (in, out) become (out, in); BatchNorm gamma, beta,
    moving_mean, moving_variance become weight, bias, running_mean, running_var.

    Raises `ModelUnavailable` when the file's layers do not match the layout.
    """
    by_kind: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for layer, weights in read_keras_layers(path).items():
        m = _SUFFIX.match(layer)
        if m is None:
            raise ModelUnavailable(f"{path}: unexpected Keras layer name {layer!r}")
        by_kind.setdefault(m["kind"], []).append((int(m["n"] or 0), weights))
    queues = {
        kind: [w for _, w in sorted(items, key=lambda t: t[0])] for kind, items in by_kind.items()
    }

    wanted: dict[str, int] = {}
    for kind, _ in layout:
        wanted[kind] = wanted.get(kind, 0) + 1
    found = {kind: len(q) for kind, q in queues.items()}
    if found != wanted:
        raise ModelUnavailable(
            f"{path}: weighted Keras layers {found} do not match the architecture's {wanted}"
        )

    state: dict[str, npt.NDArray[np.float32]] = {}
    for kind, prefix in layout:
        weights = queues[kind].pop(0)
        try:
            state.update(_convert(kind, prefix, weights))
        except KeyError as exc:
            raise ModelUnavailable(f"{path}: layer for {prefix} lacks weight {exc}") from exc
    return state


def _convert(
    kind: KerasKind, prefix: str, w: dict[str, np.ndarray]
) -> dict[str, npt.NDArray[np.float32]]:
    if kind == "conv2d":
        return {
            f"{prefix}.weight": np.ascontiguousarray(w["kernel"].transpose(3, 2, 0, 1)),
            f"{prefix}.bias": w["bias"],
        }
    if kind == "dense":
        return {
            f"{prefix}.weight": np.ascontiguousarray(w["kernel"].T),
            f"{prefix}.bias": w["bias"],
        }
    return {
        f"{prefix}.weight": w["gamma"],
        f"{prefix}.bias": w["beta"],
        f"{prefix}.running_mean": w["moving_mean"],
        f"{prefix}.running_var": w["moving_variance"],
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
