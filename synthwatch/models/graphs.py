"""Detector graphs without torch: ONNX templates bound to verified weights at load time.

A template (`synthwatch/models/graphs/<name>.onnx`) is one architecture exported from our
own torch module (`python -m synthwatch.models.export`), with every parameter that comes
from a weights file left empty: its name (the torch state-dict key), shape and type stay,
its values do not. Templates are derived from our code alone, so they ship in the
package; third-party weights never do. `bind` fills a template from a state dict of
numpy arrays (read without torch by `torchfile` or `keras_h5`) and checks it the way
torch's strict loading does: every empty parameter must be given with its exact shape,
and every given key must be one the graph uses or one the template records as present
in the weights but unused by the forward pass (AASIST's first `bn1`, the ImageNet
classifier under the scene probe). A key too many or too few refuses the model, so a
wrong or damaged weights file fails at load time instead of scoring media at random.

The scanner then needs only `onnx` (to fill the protobuf) and ONNX Runtime; torch is a
training and export dependency (`pip install synthwatch[train]`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from synthwatch.errors import ModelUnavailable

GRAPH_DIR = Path(__file__).resolve().parent / "graphs"
"""Where the shipped templates live."""

UNUSED_KEY = "synthwatch.unused_keys"
"""Template metadata: JSON list of weights-file keys the graph does not read."""
ARCH_KEY = "synthwatch.arch"
"""Template metadata: the torch class the template was exported from."""

_IGNORED_SUFFIXES = ("num_batches_tracked",)
"""torch bookkeeping buffers that no inference graph reads."""


def template_path(name: str) -> Path:
    return GRAPH_DIR / f"{name}.onnx"


def is_empty(init: Any) -> bool:
    """Whether an initializer is a parameter slot waiting for weights (no values)."""
    return not (
        init.raw_data
        or init.float_data
        or init.int32_data
        or init.int64_data
        or init.double_data
        or init.data_location  # external data: not used by templates
    )


def bind(name: str, state: Mapping[str, npt.NDArray[Any]], *, what: str) -> bytes:
    """The serialized ONNX model of template `name` with `state` filled in.

    `what` names the weights in error messages (a path or model name). Raises
    `ModelUnavailable` when the template is missing, a parameter is missing or has
    another shape, or the state holds a key the graph neither reads nor lists as unused.
    """
    import onnx
    from onnx import helper

    path = template_path(name)
    try:
        model = onnx.load(str(path))
    except (OSError, DecodeError) as exc:
        raise ModelUnavailable(f"graph template {path} unreadable: {exc}") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    unused = set(json.loads(meta.get(UNUSED_KEY, "[]")))
    wanted: set[str] = set()
    problems: list[str] = []
    for init in model.graph.initializer:
        if not is_empty(init):
            continue
        wanted.add(init.name)
        value = state.get(init.name)
        if value is None:
            problems.append(f"missing {init.name}")
            continue
        shape = tuple(int(d) for d in init.dims)
        if tuple(value.shape) != shape:
            problems.append(f"{init.name}: shape {tuple(value.shape)}, graph expects {shape}")
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        init.raw_data = np.ascontiguousarray(value, dtype=dtype).tobytes()
    extra = sorted(
        k
        for k in state
        if k not in wanted and k not in unused and not k.endswith(_IGNORED_SUFFIXES)
    )
    if extra:
        problems.append(f"unexpected {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    if problems:
        arch = meta.get(ARCH_KEY, name)
        raise ModelUnavailable(
            f"{what}: weights do not fit {arch}: {'; '.join(problems[:6])}"
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    return bytes(model.SerializeToString())
