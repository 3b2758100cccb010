"""Export a detector module to ONNX with a dynamic batch axis, for ONNX Runtime and TensorRT.

Every exported detector has one input named ``input`` (float32, batch first) and one
output named ``score`` (batch first), so the inference backends need no per-model code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

ONNX_OPSET = 17
"""Lowest opset TensorRT 10 and ONNX Runtime 1.20+ both run fully; fixed so that two
exports of the same weights are byte-identical (the cache key is the weights sha256)."""


def export_onnx(
    module: nn.Module,
    dest: Path,
    input_shape: Sequence[int],
    *,
    opset: int = ONNX_OPSET,
) -> Path:
    """Export `module` (in eval mode) to ONNX at `dest` and validate it with `onnx.checker`.

    `input_shape` is one example input's shape, batch first, e.g. (1, 3, 256, 256); the
    batch axis is exported as dynamic (``batch``). Writes `dest` directly; callers that
    need atomicity export to a temporary path and rename it (`ModelStore.onnx_path` does).

    Raises `onnx.checker.ValidationError` if the exported graph is invalid.
    """
    was_training = module.training
    module.eval()
    example = torch.zeros(tuple(input_shape), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            # Why the TorchScript exporter (dynamo=False): it needs no extra dependency
            # (the dynamo path requires onnxscript), its output is deterministic for a
            # fixed module, and these small CNNs use only ops it has covered for years.
            # torch marks it deprecated; the warning is noise for our callers.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                dest,
                dynamo=False,
                input_names=["input"],
                output_names=["score"],
                dynamic_axes={"input": {0: "batch"}, "score": {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    finally:
        module.train(was_training)
    onnx.checker.check_model(onnx.load(dest), full_check=True)
    return dest
