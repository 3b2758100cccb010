"""Inference throughput and memory of every shipped model on every backend, 2 CPU threads.

For each model in the registry (`synthwatch/models/registry.py`) and each backend, items/s
at several batch sizes and the peak resident set. Backends are built exactly as the
pipeline builds them (`Engine._load`: `ModelStore.onnx_path` for ONNX Runtime, the
store's torch module for torch, `torch.set_num_threads(threads)`), plus the torch
variants the pipeline could adopt: channels_last and, in the full run only (it costs
7-30 s per shape, PERF_NOTES.md), torch.compile for the image models.

Each (model, backend) runs in its own child process (`--one MODEL BACKEND`), because
`ru_maxrss` is a high-water mark: measured in one process, every backend would report the
largest peak seen so far. The full run repeats the whole sweep and interleaves the
children, so drift hits every backend alike; ratios are each backend's items/s over torch
eager's at the same batch, measured in the same run.

    python -m benchmarks.bench_inference [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import ROOT, Report, median_timed, peak_rss_mb, timed

THREADS = 2
"""`Settings.models.threads`: the pipeline's default, one per core of this machine."""

FULL_BATCHES = (1, 2, 4, 8, 16, 32, 64)
QUICK_BATCHES = (1, 8, 32)
AUDIO_MAX_BATCH = 8
"""AASIST needs about 140 MB of activations per window; the pipeline caps audio at 8
(`Settings.models.audio_max_batch`)."""

BACKENDS = ("torch", "torch_cl", "torch_compile", "ort_whole", "onnxruntime", "tensorrt")
LABEL = {
    "torch": "eager",
    "torch_cl": "chan_last",
    "torch_compile": "compile",
    "ort_whole": "ORT whole",
    "onnxruntime": "ORT by row",
    "tensorrt": "TensorRT",
}
"""Short, so the table fits 80 columns: torch eager (NCHW), torch channels_last (what
`select_backend("torch")` builds on CPU), torch.compile, ONNX Runtime running each batch
whole (`rows_per_run=0`, the default for image models), ONNX Runtime one row per run
(`rows_per_run=1`, what the engine uses for audio models), TensorRT FP16."""
MTCNN_FRAME = (360, 640)
"""MTCNN scores frames, not crops: 640x360 frames (items are frames)."""


def _model_dir() -> Path:
    env = os.environ.get("SYNTHWATCH_MODEL_DIR")
    if env:
        return Path(env)
    return (ROOT / ".." / "shared" / "weights").resolve()


def _store() -> Any:
    from synthwatch.models.registry import ModelStore

    # The default cache dir, as `Engine` uses it, so the ONNX files are the pipeline's.
    return ModelStore(_model_dir())


# --- the child: one (model, backend) --------------------------------------------------


def _make_runner(model: str, backend: str) -> tuple[Callable[[Any], Any], Callable[[int], Any]]:
    """(run one batch, make an input batch of size n) for the backend the pipeline builds."""
    import torch

    torch.set_num_threads(THREADS)
    store = _store()
    spec = store.spec(model)
    rng = np.random.default_rng(0)

    if spec.kind == "face_detector":
        from synthwatch.models.mtcnn_nets import array_nets, load_mtcnn_nets
        from synthwatch.operators.faces import FaceDetector

        detector = FaceDetector(array_nets(load_mtcnn_nets(store.resolve(model))))
        h, w = MTCNN_FRAME
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return detector.detect, lambda n: [frame.copy() for _ in range(n)]

    def make(n: int) -> Any:
        return rng.random((n, *spec.input_shape), dtype=np.float32)

    from synthwatch.operators import infer

    if backend in ("onnxruntime", "ort_whole"):
        b: infer.InferenceBackend = infer.OnnxRuntimeBackend(
            store.onnx_path(model),
            threads=THREADS,
            rows_per_run=0 if backend == "ort_whole" else 1,
        )
    elif backend == "tensorrt":
        b = infer.TensorRTBackend(
            store.onnx_path(model),
            cache_dir=store.cache_dir / "tensorrt",
            max_batch=max(FULL_BATCHES),
        )
    elif backend in ("torch", "torch_cl"):
        b = infer.TorchBackend(store.load_torch(model), channels_last=backend == "torch_cl")
    elif backend == "torch_compile":
        module = torch.compile(store.load_torch(model))
        b = infer.TorchBackend(module)
    else:
        raise ValueError(f"unknown backend {backend}")
    return b.run, make


def run_one(model: str, backend: str, batches: Sequence[int], seconds: float) -> dict[str, Any]:
    """Items/s at each batch size and the peak RSS of this process (run it alone)."""
    # What every configuration pays before building anything: torch and synthwatch loaded.
    import torch  # noqa: F401

    import synthwatch.models.registry  # noqa: F401

    base_rss = _current_rss_mb()
    (run, make), setup = timed(lambda: _make_runner(model, backend))
    out: dict[str, Any] = {"model": model, "backend": backend, "setup_s": setup.wall_s}
    per_batch: dict[str, float] = {}
    first_call: dict[str, float] = {}
    for n in batches:
        x = make(n)
        _, first = timed(lambda x=x: run(x))
        first_call[str(n)] = first.wall_s
        _, warm = timed(lambda x=x: run(x))
        # Enough calls per sample that timer and scheduler noise stay small.
        iters = max(1, round(seconds / max(warm.wall_s, 1e-4)))

        def loop(x: Any = x, iters: int = iters) -> None:
            for _ in range(iters):
                run(x)

        # A call slower than the sample (AASIST eager at batch 8: seconds) is timed once
        # in --quick; the full run always takes the median of three.
        repeats = 1 if seconds < 0.5 and warm.wall_s > seconds else 3
        _, t = median_timed(loop, repeats=repeats)
        per_batch[str(n)] = n * iters / t.wall_s
    out["items_per_s"] = per_batch
    out["first_call_s"] = first_call
    out["peak_rss_mb"] = peak_rss_mb()
    out["import_rss_mb"] = base_rss
    return out


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the parent: the sweep -------------------------------------------------------------


def _child(
    model: str, backend: str, batches: Sequence[int], seconds: float
) -> dict[str, Any] | str:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_inference",
        "--one",
        model,
        backend,
        "--batches",
        ",".join(map(str, batches)),
        "--seconds",
        str(seconds),
    ]
    env = {**os.environ, "SYNTHWATCH_MODEL_DIR": str(_model_dir())}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"failed: {tail[:200]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _plan(
    quick: bool, models: Sequence[str] | None
) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict[tuple[str, str], str], list[str]]:
    """(configs to run, cells that are a note instead of numbers, notes)."""
    from synthwatch.operators.infer import gpu_available, tensorrt_available

    store = _store()
    batches = QUICK_BATCHES if quick else FULL_BATCHES
    configs: list[tuple[str, str, tuple[int, ...]]] = []
    skipped: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    trt = tensorrt_available()
    for spec in store.specs:
        if models and spec.name not in models:
            continue
        if not store.available(spec.name):
            notes.append(
                f"{spec.name}: weights not in {store.model_dir}; skipped "
                f"(SYNTHWATCH_MODEL_DIR=../shared/weights)"
            )
            continue
        bs = batches
        if spec.kind in ("audio", "face_detector"):
            bs = tuple(sorted({min(b, AUDIO_MAX_BATCH) for b in batches}))
        image = len(spec.input_shape) == 3 and spec.kind != "face_detector"
        for backend in BACKENDS:
            if backend == "tensorrt" and not trt:
                skipped[(spec.name, backend)] = "no tensorrt" if gpu_available() else "no GPU"
            elif (spec.kind == "face_detector" and backend != "torch") or (
                backend == "torch_cl" and not image
            ):
                skipped[(spec.name, backend)] = "n/a"
            elif backend == "torch_compile" and (quick or not image):
                skipped[(spec.name, backend)] = "full run" if image else "n/a"
            else:
                # Exported here, once, so no child pays (or measures the memory of) it.
                if backend in ("onnxruntime", "ort_whole", "tensorrt"):
                    store.onnx_path(spec.name)
                configs.append((spec.name, backend, bs))
    if "mtcnn" in {c[0] for c in configs}:
        notes.append(
            f"mtcnn: the three-stage cascade as the pipeline runs it (torch, FaceDetector), "
            f"items = {MTCNN_FRAME[1]}x{MTCNN_FRAME[0]} noise frames with no faces, so R-Net "
            "and O-Net see few candidates; it has no ONNX export, so only torch eager is run"
        )
    return configs, skipped, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_inference")
    parser.add_argument("--quick", action="store_true", help="batches 1, 8, 32; one round")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--batches", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="", help="comma-separated subset of models")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)

    if args.one:
        batches = [int(b) for b in args.batches.split(",") if b]
        result = run_one(args.one[0], args.one[1], batches, args.seconds)
        print(json.dumps(result))
        return 0

    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 0.2 if args.quick else 0.6
    models = [m for m in args.models.split(",") if m] or None
    configs, skipped, notes = _plan(args.quick, models)

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: dict[tuple[str, str], str] = {}
    t0 = time.perf_counter()
    for r in range(rounds):
        for model, backend, bs in configs:
            print(f"round {r + 1}/{rounds}: {model} on {LABEL[backend]} ...", flush=True)
            got = _child(model, backend, bs, seconds)
            if isinstance(got, str):
                failures[(model, backend)] = got
            else:
                results.setdefault((model, backend), []).append(got)

    all_batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    columns = ["model", "backend", *(f"b={b}" for b in all_batches), "peak RSS MB"]
    report = Report(
        name="inference",
        title=f"Inference items/s on {THREADS} threads (x = vs torch eager at the same batch)",
        columns=columns,
        params={
            "quick": args.quick,
            "rounds": rounds,
            "threads": THREADS,
            "seconds_per_sample": seconds,
            "batches": list(all_batches),
            "audio_max_batch": AUDIO_MAX_BATCH,
            "model_dir": str(_model_dir()),
            "elapsed_s": round(time.perf_counter() - t0, 1),
        },
        notes=notes,
    )

    def median_ips(model: str, backend: str) -> dict[int, float]:
        runs = results.get((model, backend), [])
        keys = {int(k) for run in runs for k in run["items_per_s"]}
        return {
            b: statistics.median(run["items_per_s"][str(b)] for run in runs) for b in sorted(keys)
        }

    seen_models = list(dict.fromkeys(m for m, _, _ in configs))
    for model in seen_models:
        eager = median_ips(model, "torch")
        for backend in BACKENDS:
            row: dict[str, Any] = {"model": model, "backend": LABEL[backend]}
            key = (model, backend)
            if key in skipped or key in failures:
                why = skipped.get(key) or failures[key]
                for b in all_batches:
                    row[f"b={b}"] = why if key in skipped else "failed"
                row["note"] = why
                report.rows.append(row)
                continue
            ips = median_ips(model, backend)
            runs = results[key]
            ratios = {b: v / eager[b] for b, v in ips.items() if b in eager}
            for b in all_batches:
                if b in ips:
                    cell = f"{ips[b]:.3g}" if ips[b] < 1000 else f"{ips[b]:,.0f}"
                    if backend != "torch" and b in ratios:
                        cell += f" ({ratios[b]:.2f}x)"
                    row[f"b={b}"] = cell
            row["peak RSS MB"] = round(max(run["peak_rss_mb"] for run in runs))
            row["items_per_s"] = {str(b): round(v, 2) for b, v in ips.items()}
            row["vs_eager"] = {str(b): round(v, 3) for b, v in ratios.items()}
            row["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
            row["import_rss_mb"] = statistics.median(run["import_rss_mb"] for run in runs)
            if backend == "onnxruntime" and (model, "ort_whole") in results:
                whole = median_ips(model, "ort_whole")
                row["vs_ort_whole"] = {
                    str(b): round(v / whole[b], 3) for b, v in ips.items() if b in whole
                }
            row["setup_s"] = statistics.median(run["setup_s"] for run in runs)
            row["first_call_s"] = runs[-1]["first_call_s"]
            report.rows.append(row)
    for (model, backend), why in failures.items():
        report.notes.append(f"{model} on {LABEL[backend]}: {why}")
    report.notes.append(
        "peak RSS includes about "
        f"{statistics.median(r['import_rss_mb'] for rs in results.values() for r in rs):.0f} MB "
        "of imports (torch, synthwatch) that every configuration pays"
        if results
        else "no configuration ran"
    )
    if any(b == "torch_compile" for _, b, _ in configs):
        report.notes.append(
            "torch.compile: first_call_s in the JSON is the compile time per batch shape"
        )
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
