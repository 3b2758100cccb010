"""The TensorRT path on a real NVIDIA GPU, in one run: build, check, measure.

For every shipped image and audio model whose weights are present: export to ONNX (the
pipeline's own export), take ONNX Runtime on the CPU as the reference, build an FP16
TensorRT engine with a dynamic batch profile (cached by model sha256, TensorRT version,
GPU name and profile: `synthwatch.operators.infer.engine_cache_key`), compare its scores
with the reference, and time it against torch eager (FP32, and FP16 beside it) on the
same GPU at batch 1 to 256. Then an end-to-end `synthwatch scan` on the GPU backend while
sampling GPU utilisation, and the same items with ONNX Runtime on the CPU. Where
TensorRT cannot be imported, every TensorRT figure is recorded as unmeasured with the
reason, never estimated; torch eager is still measured, and the scan runs on the torch
backend, which is then the GPU path.

Run through `benchmarks/gpu_check.sh`, which installs what is missing and bounds the
time. Writes `gpu_check.json` into `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

TOLERANCE = 0.02
"""Largest |score difference| accepted between the FP16 engine and FP32 ONNX Runtime:
scores are probabilities in [0, 1]; FP16 keeps about 3 significant digits, so a
difference above 0.02 means a wrong engine rather than rounding."""

IMAGE_MODELS = ("sbi_face", "fingerprint", "meso4_df", "mesoinception4_f2f")
AUDIO_MODELS = ("aasist", "aasist_l")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
AUDIO_MAX_BATCH = 64


def _gpu_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "name": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability(0)),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = "unavailable"
    return info


def _tensorrt() -> tuple[Any, str]:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken install's OSError
        return None, f"tensorrt cannot be imported: {type(exc).__name__}: {exc}"
    return trt, ""


def _time_cuda(fn: Any, min_seconds: float = 0.4, max_iters: int = 200) -> float:
    """Seconds per call of `fn` on the GPU: warm-up, then CUDA-synchronised timing."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while iters < max_iters and (iters < 5 or time.perf_counter() - t0 < min_seconds):
        fn()
        iters += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def check_model(
    store: Any, name: str, batches: tuple[int, ...], trt: Any, cache_dir: Path
) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from synthwatch.operators.infer import TensorRTBackend

    spec = store.spec(name)
    module = store.load_torch(name).cuda().eval()
    onnx_path = store.onnx_path(name)
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((8, *spec.input_shape)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = np.asarray(
        session.run(None, {session.get_inputs()[0].name: probe})[0], dtype=np.float32
    ).reshape(-1)
    with torch.inference_mode():
        eager_scores = module(torch.from_numpy(probe).cuda()).float().cpu().numpy().reshape(-1)
    result: dict[str, Any] = {
        "input_shape": list(spec.input_shape),
        "onnx": onnx_path.name,
        "eager_vs_onnxruntime_max_abs": float(np.max(np.abs(eager_scores - reference))),
        "rows": [],
    }
    # FP16 eager is what the GPU gives without TensorRT: a bound on what the torch
    # backend could gain from half precision, measured beside FP32 in the same run.
    half = None
    try:
        half = copy.deepcopy(module).half()
        with torch.inference_mode():
            half_scores = half(torch.from_numpy(probe).cuda().half()).float().cpu().numpy()
        result["eager_fp16_vs_onnxruntime_max_abs"] = float(
            np.max(np.abs(half_scores.reshape(-1) - reference))
        )
    except Exception as exc:  # a model with FP32-only layers: FP32 rows still stand
        half = None  # the half-precision copy may have been made before the failure
        result["eager_fp16"] = f"not measured: {type(exc).__name__}: {exc}"
    engine = None
    if trt is not None:
        t0 = time.perf_counter()
        engine = TensorRTBackend(onnx_path, cache_dir=cache_dir, max_batch=max(batches), fp16=True)
        result["engine_build_s"] = round(time.perf_counter() - t0, 2)
        result["engine"] = engine.engine_path.name
        trt_scores = engine.run(probe)
        diff = float(np.max(np.abs(trt_scores - reference)))
        result["tensorrt_vs_onnxruntime_max_abs"] = diff
        result["tensorrt_within_tolerance"] = diff <= TOLERANCE
    for n in batches:
        x_np = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
        x = torch.from_numpy(x_np).cuda()

        def eager(x: Any = x) -> None:
            with torch.inference_mode():
                module(x)

        row: dict[str, Any] = {"batch": n, "eager_items_s": n / _time_cuda(eager)}
        if half is not None:
            xh = x.half()

            def eager_fp16(xh: Any = xh) -> None:
                with torch.inference_mode():
                    half(xh)

            row["eager_fp16_items_s"] = n / _time_cuda(eager_fp16)
            row["eager_fp16_vs_fp32"] = row["eager_fp16_items_s"] / row["eager_items_s"]
            del xh
        if engine is not None:
            # End to end as the pipeline calls it: host batch in, host scores out.
            row["tensorrt_items_s"] = n / _time_cuda(lambda x_np=x_np: engine.run(x_np))
            row["tensorrt_vs_eager"] = row["tensorrt_items_s"] / row["eager_items_s"]
        result["rows"].append(row)
        del x
        torch.cuda.empty_cache()
    return result


SCAN_REPEAT = 6
"""How many times the scan goes over the mixed set, so that the GPU is fed for a while."""
AUDIO_ITEMS = 8


def _busy_sampler() -> tuple[Any, list[int]]:
    """Start sampling NVML GPU utilisation every 100 ms; returns (stop event, samples).
    Without NVML the samples stay empty and busy is reported as unmeasured."""
    busy: list[int] = []
    stop = threading.Event()
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML binding or driver: busy unmeasured, the scan still runs
        return stop, busy

    def sample() -> None:
        while not stop.is_set():
            busy.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    return stop, busy


def _scan_media(work: Path) -> list[str]:
    """bench_e2e's kind of mixed set, shorter so that it is made in seconds: camera-like
    H.264 clips (720p and 1080p, short and long GOP) and JPEG stills with real faces
    (`bench_sampling.face_patch`), so the face and whole-image models run, repeated
    `SCAN_REPEAT` times; then audio-only WAVs (20 s, five 4 s windows) for the audio
    models."""
    from benchmarks import bench_e2e, bench_sampling
    from tests.media_factory import make_audio

    clips = [
        bench_sampling.Clip("libx264", 720, 30, 8.0),
        bench_sampling.Clip("libx264", 1080, 30, 8.0),
        bench_sampling.Clip("libx264", 1080, 250, 8.0),
    ]
    _, stills = bench_e2e.media_specs(quick=True)

    def still(i: int) -> str:
        path = work / f"{stills[i].name}.jpg"
        bench_e2e._still(stills[i], path, seed=i)
        return str(path)

    with ThreadPoolExecutor(max_workers=8) as pool:
        made = list(pool.map(lambda c: str(bench_sampling.make_clip(c, work)), clips))
        made += list(pool.map(still, range(len(stills))))
        audio = list(
            pool.map(
                lambda i: str(make_audio(work / f"speech{i}.wav", 20.0, rate=16000, channels=1)),
                range(AUDIO_ITEMS),
            )
        )
    return made * SCAN_REPEAT + audio


def _timed_scan(backend: str, media: list[str], workers: int) -> dict[str, Any]:
    from collections import Counter

    from synthwatch.pipeline.cli import load_settings
    from synthwatch.pipeline.scan import scan_all

    settings = load_settings(models__backend=backend)
    scan_all(settings, media[:2], workers=workers)  # warm-up: model load, engine build
    stop, busy = _busy_sampler()
    t0 = time.perf_counter()
    results = scan_all(settings, media, workers=workers)
    wall = time.perf_counter() - t0
    stop.set()
    scored = [r.verdict for r in results if r.verdict is not None]
    return {
        "backend": backend,
        "items": len(media),
        "scored": len(scored),
        "errors": sorted({r.error or "" for r in results} - {""})[:5],
        "items_s": len(media) / wall,
        "gpu_busy_mean_pct": float(np.mean(busy)) if busy else None,
        "signals": dict(Counter(s.name for v in scored for s in v.signals)),
        # One entry per item, in media order (None: not scored), so two backends' runs
        # compare item by item even when one of them failed an item.
        "scores": [
            None
            if r.verdict is None or r.verdict.synthetic_score is None
            else float(r.verdict.synthetic_score)
            for r in results
        ],
    }


def scan_end_to_end(work: Path, trt: Any) -> dict[str, Any]:
    """`synthwatch scan` on the GPU backend (TensorRT when it imports, else torch on the
    GPU) and, on the same items in the same run, ONNX Runtime on the CPU: items/s, NVML
    GPU busy sampled every 100 ms, how often each signal ran, and the largest difference
    between the two backends' synthetic scores.

    A scan in which no model ran measures decoding alone, so it is reported as
    unmeasured."""
    media = _scan_media(work)
    workers = max(2, os.cpu_count() or 2)
    gpu_backend = "tensorrt" if trt is not None else "torch"
    gpu = _timed_scan(gpu_backend, media, workers)
    cpu = _timed_scan("onnxruntime", media, workers)
    models = set(IMAGE_MODELS + AUDIO_MODELS)
    ran = sorted(models & (gpu["signals"].keys() | cpu["signals"].keys()))
    diffs = [
        abs(g - c)
        for g, c in zip(gpu.pop("scores"), cpu.pop("scores"), strict=True)
        if g is not None and c is not None
    ]
    report: dict[str, Any] = {
        "measured": bool(ran),
        "items": len(media),
        "workers": workers,
        "models_ran": ran,
        "gpu_backend": gpu_backend,
        "gpu": gpu,
        "cpu_onnxruntime": cpu,
        "gpu_vs_cpu_items_s": gpu["items_s"] / cpu["items_s"],
        "score_max_abs_diff": max(diffs) if diffs else None,
        "note": "GPU busy is NVML utilisation sampled every 100 ms during the timed scan",
    }
    if not ran:
        report["why"] = "no model scored any item: the scan measured decoding alone"
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = tuple(int(b) for b in args.batches.split(","))

    import torch

    from synthwatch.models.registry import ModelStore
    from synthwatch.pipeline.settings import Settings

    report: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "tolerance": TOLERANCE,
        "models": {},
    }
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device visible"
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 1
    report["gpu"] = _gpu_info()
    trt, why = _tensorrt()
    report["tensorrt"] = {"version": trt.__version__} if trt is not None else {"unmeasured": why}
    settings = Settings()
    store = ModelStore(settings.model_dir)
    cache = Path(tempfile.mkdtemp(prefix="sw-trt-"))
    for name in (*IMAGE_MODELS, *AUDIO_MODELS):
        if not store.available(name):
            report["models"][name] = {"skipped": "weights not present on this machine"}
            continue
        sizes = tuple(b for b in batches if name not in AUDIO_MODELS or b <= AUDIO_MAX_BATCH)
        try:
            report["models"][name] = check_model(store, name, sizes, trt, cache)
        except Exception as exc:  # one model's failure is a finding, not the end of the run
            report["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        print(name, json.dumps(report["models"][name])[:400], flush=True)
    try:
        report["scan"] = scan_end_to_end(Path(tempfile.mkdtemp(prefix="sw-scan-")), trt)
    except Exception as exc:
        report["scan"] = {"measured": False, "why": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    at64 = [
        r["tensorrt_vs_eager"]
        for m in report["models"].values()
        for r in m.get("rows", [])
        if r["batch"] == 64 and "tensorrt_vs_eager" in r
    ]
    report["targets"] = {
        "tensorrt_fp16_vs_eager_at_batch_64_min": min(at64) if at64 else None,
        "target": ">= 3.0 (issue 5)",
        "met": (min(at64) >= 3.0) if at64 else None,
        "scan_gpu_backend": report["scan"].get("gpu_backend"),
        "scan_gpu_busy_mean_pct": report["scan"].get("gpu", {}).get("gpu_busy_mean_pct"),
        "scan_gpu_busy_target": ">= 80 with the TensorRT backend (issue 5)",
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
