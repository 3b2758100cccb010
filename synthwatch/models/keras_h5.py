"""Convert Keras 2.x `save_weights` HDF5 files into torch state dicts.

Used for the MesoNet weights (DariusAf/MesoNet, Keras 2.1.5). Keras stores, per layer,
a group named after the layer whose `weight_names` attribute lists its datasets in order;
the root's `layer_names` attribute lists the layers. We read those attributes rather than
guessing dataset paths, and map layers to torch modules by kind and creation order (see
`Meso4.KERAS_LAYERS`), so a file whose layer counters start elsewhere (conv2d_5.. vs
conv2d_1..) still converts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from synthwatch.errors import ModelUnavailable
from synthwatch.models.meso import KerasKind

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
) -> dict[str, torch.Tensor]:
    """Build a torch state dict from a Keras weights file.

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

    state: dict[str, torch.Tensor] = {}
    for kind, prefix in layout:
        weights = queues[kind].pop(0)
        try:
            state.update(_convert(kind, prefix, weights))
        except KeyError as exc:
            raise ModelUnavailable(f"{path}: layer for {prefix} lacks weight {exc}") from exc
    return state


def load_keras_weights(
    module: nn.Module, path: Path, layout: Sequence[tuple[KerasKind, str]]
) -> None:
    """Load a Keras weights file into `module` with a strict key and shape check.

    Raises `ModelUnavailable` on any missing or unexpected key or shape mismatch: a
    silently half-loaded detector would score media with random weights.
    """
    state = keras_state_dict(path, layout)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(
            f"{path}: weights do not fit {type(module).__name__}: {exc}"
        ) from exc


def _convert(kind: KerasKind, prefix: str, w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    if kind == "conv2d":
        return {
            f"{prefix}.weight": torch.from_numpy(
                np.ascontiguousarray(w["kernel"].transpose(3, 2, 0, 1))
            ),
            f"{prefix}.bias": torch.from_numpy(w["bias"]),
        }
    if kind == "dense":
        return {
            f"{prefix}.weight": torch.from_numpy(np.ascontiguousarray(w["kernel"].T)),
            f"{prefix}.bias": torch.from_numpy(w["bias"]),
        }
    return {
        f"{prefix}.weight": torch.from_numpy(w["gamma"]),
        f"{prefix}.bias": torch.from_numpy(w["beta"]),
        f"{prefix}.running_mean": torch.from_numpy(w["moving_mean"]),
        f"{prefix}.running_var": torch.from_numpy(w["moving_variance"]),
        # torch-only bookkeeping buffer; strict loading requires it to be present.
        f"{prefix}.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
