"""Export detector modules to ONNX: whole models, and the weight-free graph templates.

Every exported detector has one input named ``input`` (float32, batch first) and one
output named ``score`` (batch first), so the inference backends need no per-model code;
the MTCNN nets keep their several outputs. This module needs torch (`synthwatch[train]`):
the scanner itself loads the shipped templates (`synthwatch.models.graphs`) without it.

    python -m synthwatch.models.export [--model-dir ../shared/weights] [NAME ...]

rewrites the templates under `synthwatch/models/graphs/` from the torch modules; run it
after changing an architecture, and commit the result (`tests/unit/test_graphs.py`
checks each template against its module).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnx
import torch
from torch import nn

from synthwatch.models.graphs import ARCH_KEY, UNUSED_KEY, template_path

ONNX_OPSET = 17
"""Lowest opset TensorRT 10 and ONNX Runtime 1.20+ both run fully; fixed so that two
exports of the same weights are byte-identical (the cache key is the weights sha256)."""


def _export(
    module: nn.Module,
    dest: Path | io.BytesIO,
    input_shape: Sequence[int],
    *,
    opset: int,
    fold: bool,
    outputs: Sequence[str] = ("score",),
    dynamic_hw: bool = False,
) -> None:
    was_training = module.training
    module.eval()
    example = torch.zeros(tuple(input_shape), dtype=torch.float32)
    batch_axes: dict[int, str] = {0: "batch"}
    if dynamic_hw:
        batch_axes |= {2: "height", 3: "width"}
    axes: dict[str, dict[int, str]] = {"input": batch_axes}
    axes |= {name: {0: "batch"} for name in outputs}
    try:
        with warnings.catch_warnings():
            # Why the TorchScript exporter (dynamo=False): it needs no extra dependency
            # (the dynamo path requires onnxscript), its output is deterministic for a
            # fixed module, and these small CNNs use only ops it has covered for years.
            # torch marks it deprecated; the warning is noise for our callers.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            torch.onnx.export(
                module,
                (example,),
                dest,  # type: ignore[arg-type]  # a file object works; the stub says paths
                dynamo=False,
                input_names=["input"],
                output_names=list(outputs),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=fold,
                training=torch.onnx.TrainingMode.EVAL,
            )
    finally:
        module.train(was_training)


def export_onnx(
    module: nn.Module,
    dest: Path,
    input_shape: Sequence[int],
    *,
    opset: int = ONNX_OPSET,
) -> Path:
    """Export `module` (in eval mode) to ONNX at `dest` and validate it with `onnx.checker`.

    `input_shape` is one example input's shape, batch first, e.g. (1, 3, 256, 256); the
    batch axis is exported as dynamic (``batch``). Writes `dest` directly.

    Raises `onnx.checker.ValidationError` if the exported graph is invalid.
    """
    _export(module, dest, input_shape, opset=opset, fold=True)
    onnx.checker.check_model(onnx.load(dest), full_check=True)
    return dest


def export_template(
    module: nn.Module,
    name: str,
    input_shape: Sequence[int],
    state: Mapping[str, npt.NDArray[Any]],
    *,
    outputs: Sequence[str] = ("score",),
    dynamic_hw: bool = False,
    dest: Path | None = None,
) -> Path:
    """Write template `name`: `module`'s graph with the parameters `state` supplies left
    empty (name, shape and type kept), and the keys of `state` the graph does not read
    recorded as unused. Exported without constant folding, so each parameter stays one
    initializer named by its state-dict key (ONNX Runtime folds at session creation).

    Raises ValueError when a key of `state` is bound to an initializer of another shape.
    """
    buf = io.BytesIO()
    _export(
        module,
        buf,
        input_shape,
        opset=ONNX_OPSET,
        fold=False,
        outputs=outputs,
        dynamic_hw=dynamic_hw,
    )
    model = onnx.load_from_string(buf.getvalue())
    used: set[str] = set()
    for init in model.graph.initializer:
        if init.name not in state:
            continue
        if tuple(init.dims) != tuple(state[init.name].shape):
            raise ValueError(
                f"{name}: {init.name} is {tuple(init.dims)} in the graph, "
                f"{tuple(state[init.name].shape)} in the weights"
            )
        used.add(init.name)
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(field)
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    del model.metadata_props[:]
    for key, value in (
        (ARCH_KEY, type(module).__name__),
        (UNUSED_KEY, json.dumps(unused)),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "synthwatch", ""
    out = dest or template_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out


def export_templates(model_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """Re-export the templates of the registered models `names` (all when empty) from
    their torch modules, with the weights under `model_dir` telling which parameters
    come from files. Raises `ModelUnavailable` when a model's weights are missing."""
    from synthwatch.models.registry import ModelStore

    store = ModelStore(model_dir)
    written: list[Path] = []
    done: set[str] = set()
    for spec in store.specs:
        if names and spec.name not in names:
            continue
        states = spec.state(store.resolve(spec.name))
        modules = store.torch_modules(spec.name)
        for graph, module, state in zip(spec.graphs, modules, states, strict=True):
            if graph.name in done:
                continue
            done.add(graph.name)
            written.append(
                export_template(
                    module,
                    graph.name,
                    (1, *graph.input_shape),
                    state,
                    outputs=graph.outputs,
                    dynamic_hw=graph.dynamic_hw,
                )
            )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-export the shipped ONNX graph templates.")
    parser.add_argument("names", nargs="*", help="registered models (default: all)")
    parser.add_argument("--model-dir", type=Path, default=Path("../shared/weights"))
    args = parser.parse_args(argv)
    for path in export_templates(args.model_dir, args.names):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
