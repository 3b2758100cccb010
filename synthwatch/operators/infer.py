"""Inference backends behind one interface: ONNX Runtime (CPU default), torch, TensorRT.

A backend turns a float32 NCHW batch into one synthetic score per row. Which backend
runs is a deployment choice, not a code change: `select_backend("auto", ...)` picks
TensorRT when an NVIDIA GPU and the `tensorrt` package are present; torch on the GPU
when there is a GPU but no TensorRT (on an H100 with 16 CPU cores, a scan ran 1.23x
the ONNX Runtime CPU scan of the same items, scores within 6.2e-5: docs/PERFORMANCE.md);
else ONNX Runtime on the CPU (1.6-6.8x faster than eager torch on 2 cores for these
models, PERF_NOTES.md).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from synthwatch.errors import ModelUnavailable

BackendName = Literal["auto", "onnxruntime", "torch", "tensorrt"]
Batch = npt.NDArray[np.float32]


class InferenceBackend(ABC):
    """Runs one model on batches. Implementations are not required to be thread-safe:
    the batcher calls `run` from its single thread."""

    name: str

    @abstractmethod
    def run(self, batch: Batch) -> Batch:
        """(N, C, H, W) float32 -> (N,) float32 scores."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends own nothing to free
        """Release what the backend holds."""


def cpu_session(model: Path | bytes, *, threads: int) -> Any:
    """An ONNX Runtime CPU session tuned for a scanner that decodes beside inference."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    # Spin-waiting threads steal CPU from the decoder running beside inference
    # (3-9% measured on 2 cores, PERF_NOTES.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=opts,
        providers=["CPUExecutionProvider"],
    )


class OnnxNet:
    """A network of several outputs (MTCNN's) as a plain callable: float32 NCHW batch
    in, its outputs in graph order out. Safe to call from several threads (ONNX
    Runtime sessions are)."""

    def __init__(self, model: Path | bytes, *, threads: int = 1) -> None:
        self._session = cpu_session(model, threads=threads)
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: Batch) -> tuple[Batch, ...]:
        outs = self._session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})
        return tuple(np.asarray(o, dtype=np.float32) for o in outs)


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, model: Path | bytes, *, threads: int = 2, rows_per_run: int = 0) -> None:
        """`model`: an ONNX file, or a serialized model (`ModelStore.onnx_models`).
        `rows_per_run`: the most rows one session run gets (0: the whole batch); a
        larger batch runs in slices. Measured in one quiet run on 2 cores
        (benchmarks/results/inference.json): whole batches are faster for the default
        image models (sbi_face 1.19x, fingerprint 1.16x, MesoInception-4 1.7x at batch
        32; Meso-4 alone prefers rows, 0.75x), and rows use far less memory on the audio
        models at the same speed (AASIST at batch 8: 3.3 GB peak whole, 1.0 GB by row),
        so the engine runs audio models a row at a time."""
        if rows_per_run < 0:
            raise ValueError("rows_per_run must be >= 0")
        self.rows_per_run = rows_per_run
        self._session = cpu_session(model, threads=threads)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def run(self, batch: Batch) -> Batch:
        step = self.rows_per_run or len(batch)
        scores = np.empty((len(batch),), dtype=np.float32)
        for start in range(0, len(batch), step):
            # Slices of a C-contiguous batch along its first axis are contiguous: no copy.
            rows = np.ascontiguousarray(batch[start : start + step], dtype=np.float32)
            out = self._session.run([self._output], {self._input: rows})[0]
            scores[start : start + len(rows)] = np.asarray(out, dtype=np.float32).reshape(-1)
        return scores


class TorchBackend(InferenceBackend):
    name = "torch"

    def __init__(
        self, module: Any, *, device: str = "cpu", channels_last: bool = False, threads: int = 0
    ) -> None:
        """`channels_last`: run image (N, C, H, W) batches in NHWC memory order, which
        oneDNN's CPU convolutions prefer (1.1-4.8x eager NCHW for the shipped image
        models on 2 cores, benchmarks/bench_inference.py). Batches of another rank (the
        audio models' (N, samples)) always run as given."""
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self._module = module.to(self._device).eval()
        self.channels_last = channels_last
        # Converted on the first 4-D batch, so a model fed other shapes keeps its layout.
        self._converted = False

    def run(self, batch: Batch) -> Batch:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device)
            if self.channels_last and x.dim() == 4:
                if not self._converted:
                    self._module = self._module.to(memory_format=torch.channels_last)
                    self._converted = True
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._module(x)
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32).reshape(len(batch))


def engine_cache_key(
    onnx_sha256: str, trt_version: str, gpu_name: str, profile: tuple[int, int, int], fp16: bool
) -> str:
    """Engines are only valid for one TensorRT version, GPU and batch profile: key on all."""
    text = f"{onnx_sha256}|{trt_version}|{gpu_name}|{profile}|fp16={fp16}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TensorRTBackend(InferenceBackend):
    """FP16 TensorRT engine built from the ONNX file with a dynamic batch profile.

    Written against the TensorRT 10 Python API (named tensors, `execute_async_v3`);
    device buffers come from torch so no extra CUDA binding is needed. The engine is
    cached on disk by `engine_cache_key`, so the minutes-long build happens once per
    (model, TensorRT version, GPU, profile).
    """

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: Path,
        *,
        cache_dir: Path,
        max_batch: int,
        fp16: bool = True,
        device: int = 0,
    ) -> None:
        trt = importlib.import_module("tensorrt")
        import torch

        if not torch.cuda.is_available():
            raise ModelUnavailable("the tensorrt backend needs an NVIDIA GPU; none is visible")
        self._torch = torch
        self._trt = trt
        self._device = torch.device("cuda", device)
        self.max_batch = max_batch
        onnx_bytes = onnx_path.read_bytes()
        gpu = torch.cuda.get_device_name(self._device)
        profile = (1, max(1, max_batch // 2), max_batch)
        key = engine_cache_key(
            hashlib.sha256(onnx_bytes).hexdigest(), trt.__version__, gpu, profile, fp16
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        engine_path = cache_dir / f"{onnx_path.stem}-{key}.engine"
        self._logger = trt.Logger(trt.Logger.WARNING)
        if engine_path.exists():
            plan = engine_path.read_bytes()
        else:
            plan = self._build(onnx_bytes, profile, fp16)
            tmp = engine_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(plan)
            tmp.replace(engine_path)
        self.engine_path = engine_path
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ModelUnavailable(f"TensorRT could not load the engine {engine_path}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._input, self._output = inputs[0], outputs[0]
        self._stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]

    def _build(self, onnx_bytes: bytes, profile: tuple[int, int, int], fp16: bool) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelUnavailable(f"TensorRT could not parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        opt = builder.create_optimization_profile()
        inp = network.get_input(0)
        chw = tuple(inp.shape)[1:]
        lo, mid, hi = profile
        opt.set_shape(inp.name, (lo, *chw), (mid, *chw), (hi, *chw))
        config.add_optimization_profile(opt)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelUnavailable("TensorRT failed to build an engine (see its log above)")
        return bytes(plan)

    def run(self, batch: Batch) -> Batch:
        torch = self._torch
        outs: list[Batch] = []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start : start + self.max_batch]
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self._device, non_blocking=False)
            self._context.set_input_shape(self._input, tuple(x.shape))
            out_shape = tuple(self._context.get_tensor_shape(self._output))
            y = torch.empty(out_shape, dtype=torch.float32, device=self._device)
            self._context.set_tensor_address(self._input, x.data_ptr())
            self._context.set_tensor_address(self._output, y.data_ptr())
            with torch.cuda.stream(self._stream):
                ok = self._context.execute_async_v3(self._stream.cuda_stream)
            self._stream.synchronize()
            if not ok:
                raise RuntimeError("TensorRT execution failed")
            outs.append(y.float().cpu().numpy().reshape(len(chunk)))
        return np.concatenate(outs).astype(np.float32)


def nvidia_device_present() -> bool:
    """Whether the NVIDIA driver shows a device, without importing torch (which costs
    seconds and a GB of memory on a machine that has no GPU to give it)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def gpu_available() -> bool:
    if not nvidia_device_present():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install means: no GPU for us
        return False


def tensorrt_available() -> bool:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False
    return gpu_available()


def resolve_backend_name(name: BackendName) -> Literal["onnxruntime", "torch", "tensorrt"]:
    if name == "auto":
        if tensorrt_available():
            return "tensorrt"
        return "torch" if gpu_available() else "onnxruntime"
    return name


def select_backend(
    name: BackendName,
    *,
    onnx_path: Callable[[], Path],
    onnx_model: Callable[[], bytes],
    torch_module: Callable[[], Any],
    threads: int,
    max_batch: int,
    engine_cache_dir: Path,
    rows_per_run: int = 0,
) -> InferenceBackend:
    """Build the backend `name` names (`auto`: TensorRT on a GPU, else torch on a GPU,
    else ONNX Runtime on the CPU).

    The model is given lazily (callables), so only the form the backend needs is built:
    a file for TensorRT, the serialized model for ONNX Runtime, a module for torch.
    `rows_per_run` is ONNX Runtime's slicing (see `OnnxRuntimeBackend`).
    """
    chosen = resolve_backend_name(name)
    if chosen == "tensorrt":
        return TensorRTBackend(onnx_path(), cache_dir=engine_cache_dir, max_batch=max_batch)
    if chosen == "torch":
        gpu = gpu_available()
        return TorchBackend(
            torch_module(), device="cuda" if gpu else "cpu", channels_last=not gpu, threads=threads
        )
    return OnnxRuntimeBackend(onnx_model(), threads=threads, rows_per_run=rows_per_run)
