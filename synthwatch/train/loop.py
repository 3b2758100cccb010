"""Train `SbiFaceNet` and `FingerprintNet` from real media alone, reproducibly.

`train_sbi` and `train_fingerprint` collect real media (`data`), split it by source
file, make pseudo-fakes on the fly (`sbi`, `fingerprint`) and write two files into
`out`: `<name>.pt`, a float32 state dict, and `<name>.json`, the report a model card is
written from (seed, recipe, data manifest, training curve, validation AUC on held-out
sources, wall time, versions, the .pt's sha256).

Reproducibility: on CPU a seed fixes the weights bit for bit. Every random draw comes
from generators seeded from it (numpy for the data, torch for initialisation and
dropout); media files are read in sorted order; batches are made in the training
thread (no DataLoader workers, whose scheduling would reorder draws); the thread count
is fixed at 2 and `torch.use_deterministic_algorithms(True)` is on, because the
summation order of a parallel reduction, and so its rounding, depends on both. On a GPU
the run is as deterministic as cuDNN allows (the same algorithms are requested, but
bit-for-bit equality with the CPU run is not expected).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from synthwatch.digest import file_sha256
from synthwatch.models.nets import (
    FINGERPRINT_PATCH,
    SBI_INPUT_SIZE,
    FingerprintNet,
    SbiFaceNet,
    weight_bytes,
)
from synthwatch.models.registry import ModelStore
from synthwatch.operators.faces import FaceDetector, FaceFinder
from synthwatch.operators.infer import OnnxNet
from synthwatch.train.data import (
    FRAMES_PER_VIDEO,
    RealFace,
    RealFrame,
    RealSet,
    collect_real,
    detect_faces,
    split_by_source,
)
from synthwatch.train.fingerprint import MARGIN, fingerprint_pair
from synthwatch.train.sbi import sbi_pair

log = structlog.get_logger("synthwatch.train")

U8 = npt.NDArray[np.uint8]
Scored = tuple[list[U8], list[int]]
"""Images and labels (0 real, 1 fake) of one batch or one validation set."""

CPU_THREADS = 2
"""Torch threads on CPU: fixed, because reduction order (and so rounding) follows it."""


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run; all of them go into the report."""

    steps: int
    batch_pairs: int
    """Real/fake pairs per step: the batch holds twice as many images."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_fraction: float = 0.2
    """Share of source groups held out for validation."""
    val_pairs: int = 256
    checkpoints: int = 4
    """Validation AUC is measured this many times, evenly, for the curve (never used to
    pick a checkpoint: the last weights are the ones saved)."""
    vary_appearance: bool = True
    """The `vary` augmentations of `sbi.sbi_pair` (framing, colour, blur, noise alike)
    and of `fingerprint.fingerprint_pair` (blurred reals, resizing and palettes alike)."""


SBI_RECIPE = Recipe(steps=2500, batch_pairs=16)
"""About 15 minutes on 2 idle CPU cores (24 on the shared machine it was measured on);
the paper trained EfficientNet-B4 for 100 epochs of FaceForensics++ on a GPU. 1,500 steps
were too few once every pair was varied (see docs/models/sbi_face.md)."""

FINGERPRINT_RECIPE = Recipe(steps=1500, batch_pairs=32)
"""About 10 minutes on 2 CPU cores at 64x64 patches."""


@dataclass(frozen=True)
class TrainReport:
    """What a training run produced; `details` is the JSON report's content."""

    name: str
    weights: Path
    report: Path
    weights_sha256: str
    val_auc: float
    wall_time_s: float
    device: str
    details: dict[str, Any] = field(repr=False)


# --------------------------------------------------------------------------- public API


def train_sbi(
    real_dirs: Sequence[Path],
    out: Path,
    *,
    face_detector: FaceFinder | Path,
    seed: int = 0,
    steps: int | None = None,
    recipe: Recipe = SBI_RECIPE,
    device: str | None = None,
    include_bundled: bool = True,
    frames_per_video: int = FRAMES_PER_VIDEO,
    min_confidence: float = 0.9,
) -> TrainReport:
    """Train `SbiFaceNet` on real faces from `real_dirs` (and the bundled photographs)
    against their self-blended images; write `out/sbi_face.pt` and `out/sbi_face.json`.

    `face_detector` is a detector or a directory holding MTCNN's pnet.pt, rnet.pt and
    onet.pt. `steps` overrides the recipe's step count.
    Raises FileNotFoundError for a missing directory, ModelUnavailable for unusable
    MTCNN weights, ValueError when fewer than two source groups have a face (there
    would be nothing to validate on).
    """
    started = time.monotonic()
    recipe = replace(recipe, steps=steps) if steps is not None else recipe
    detector = _detector(face_detector)
    real = collect_real(
        real_dirs, frames_per_video=frames_per_video, include_bundled=include_bundled
    )
    # MTCNN runs on CPU; a fixed thread count fixes its rounding, so the same boxes and
    # the same crops come out on every machine.
    with _deterministic(seed, torch.device("cpu")):
        faces = detect_faces(real.frames, detector, min_confidence=min_confidence)
    train, val = split_by_source(
        faces,
        group=lambda f: f.group,
        val_fraction=recipe.val_fraction,
        seed=seed,
        balance="items",
    )
    if not train or not val:
        raise ValueError(f"faces found in {len({f.group for f in faces})} source groups; need 2+")
    log.info("sbi data", frames=len(real.frames), faces=len(faces), train=len(train), val=len(val))

    vary = recipe.vary_appearance

    def batch(rng: np.random.Generator) -> Scored:
        picks = rng.integers(0, len(train), size=recipe.batch_pairs)
        return _pairs([sbi_pair(train[int(i)].face, rng, vary=vary) for i in picks])

    def validation(rng: np.random.Generator) -> Scored:
        count = max(recipe.val_pairs, len(val))
        return _pairs([sbi_pair(val[i % len(val)].face, rng, vary=vary) for i in range(count)])

    data = _manifest(real, faces=faces, train=train, val=val)
    return _run(
        "sbi_face",
        SbiFaceNet,
        (3, SBI_INPUT_SIZE, SBI_INPUT_SIZE),
        batch,
        validation,
        out,
        seed=seed,
        recipe=recipe,
        device=device,
        data=data,
        started=started,
        method={
            "paper": "Shiohara & Yamasaki, Detecting Deepfakes with Self-Blended Images, CVPR 2022",
            "pseudo_fake": "self-blended image (synthwatch.train.sbi.self_blend)",
            "crop": "face box x1.3, square, inside the frame; blended at 256, "
            f"net input {SBI_INPUT_SIZE}x{SBI_INPUT_SIZE} (Pillow bilinear)",
            "face_detector": type(detector).__name__,
            "min_face_confidence": min_confidence,
        },
    )


def train_fingerprint(
    real_dirs: Sequence[Path],
    out: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    recipe: Recipe = FINGERPRINT_RECIPE,
    device: str | None = None,
    include_bundled: bool = True,
    frames_per_video: int = FRAMES_PER_VIDEO,
    patch: int = FINGERPRINT_PATCH,
) -> TrainReport:
    """Train `FingerprintNet` on native-resolution patches of the real images and frames
    in `real_dirs` (and the bundled photographs) against the same patches re-rendered by
    a simulated generator; write `out/fingerprint.pt` and `out/fingerprint.json`.

    Sources are drawn uniformly, then a frame of the source, so a video's many frames
    weigh no more than one photograph. `steps` overrides the recipe's step count.
    Raises FileNotFoundError for a missing directory, ValueError when fewer than two
    source groups hold an image large enough for a patch.
    """
    started = time.monotonic()
    recipe = replace(recipe, steps=steps) if steps is not None else recipe
    real = collect_real(
        real_dirs, frames_per_video=frames_per_video, include_bundled=include_bundled
    )
    side = patch + MARGIN
    usable = [f for f in real.frames if min(f.image.shape[:2]) >= side]
    train, val = split_by_source(
        usable, group=lambda f: f.group, val_fraction=recipe.val_fraction, seed=seed
    )
    if not train or not val:
        raise ValueError(f"images in {len({f.group for f in usable})} source groups; need 2+")
    train_sources = _by_source(train)
    val_sources = _by_source(val)
    log.info("fingerprint data", frames=len(usable), train=len(train), val=len(val))

    def draw(sources: list[list[RealFrame]], rng: np.random.Generator) -> tuple[U8, U8]:
        frames = sources[int(rng.integers(0, len(sources)))]
        image = frames[int(rng.integers(0, len(frames)))].image
        return fingerprint_pair(image, rng, patch=patch, vary=recipe.vary_appearance)

    def batch(rng: np.random.Generator) -> Scored:
        return _pairs([draw(train_sources, rng) for _ in range(recipe.batch_pairs)])

    def validation(rng: np.random.Generator) -> Scored:
        return _pairs([draw(val_sources, rng) for _ in range(recipe.val_pairs)])

    data = _manifest(real, frames=usable, train=train, val=val)
    return _run(
        "fingerprint",
        FingerprintNet,
        (3, patch, patch),
        batch,
        validation,
        out,
        seed=seed,
        recipe=recipe,
        device=device,
        data=data,
        started=started,
        method={
            "papers": [
                "Zhang, Karaman & Chang, Detecting and Simulating Artifacts in GAN Fake "
                "Images, WIFS 2019 (AutoGAN)",
                "Tan et al., Rethinking the Up-Sampling Operations in CNN-based Generative "
                "Network for Generalizable Deepfake Detection, CVPR 2024 (NPR)",
            ],
            "pseudo_fake": "downsample x2/x4, up-sample by nearest, bilinear, bicubic or "
            "random transposed conv, optional random 3x3 conv "
            "(synthwatch.train.fingerprint.simulate_generator)",
            "patch": f"{patch}x{patch} native resolution, never resized",
        },
    )


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


def to_tensor(images: Sequence[U8]) -> torch.Tensor:
    """uint8 HxWx3 images -> float32 NCHW in [0, 1], as the scanner's `to_batch` does."""
    arr = np.stack(images).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def score(net: nn.Module, images: Sequence[U8], *, batch: int = 64) -> list[float]:
    """Synthetic scores of `images` with `net` in eval mode, on the net's device."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_tensor(images[start : start + batch]).to(device)
            out.extend(float(v) for v in net(x).cpu())
    net.train(was_training)
    return out


# --------------------------------------------------------------------------- internals


def _detector(face_detector: FaceFinder | Path) -> FaceFinder:
    if isinstance(face_detector, Path):
        # The MTCNN weights directory inside a model dir (`<model_dir>/mtcnn`): the
        # store checks their sha256 and binds them into the shipped graphs.
        models = ModelStore(face_detector.parent).onnx_models("mtcnn")
        pnet, rnet, onet = (OnnxNet(m) for m in models)
        return FaceDetector((pnet, rnet, onet))
    return face_detector


def _pairs(pairs: Sequence[tuple[U8, U8]]) -> Scored:
    images = [real for real, _ in pairs] + [fake for _, fake in pairs]
    return images, [0] * len(pairs) + [1] * len(pairs)


def _by_source(frames: Sequence[RealFrame]) -> list[list[RealFrame]]:
    grouped: dict[str, list[RealFrame]] = {}
    for frame in frames:
        grouped.setdefault(frame.source, []).append(frame)
    return [grouped[k] for k in sorted(grouped)]


def _manifest(
    real: RealSet,
    *,
    train: Sequence[RealFace | RealFrame],
    val: Sequence[RealFace | RealFrame],
    faces: Sequence[RealFace] | None = None,
    frames: Sequence[RealFrame] | None = None,
) -> dict[str, Any]:
    """Sources with sha256, split side and what each contributed."""
    train_groups = {item.group for item in train}
    val_groups = {item.group for item in val}
    rows = []
    for src in real.sources:
        row = src.as_dict()
        row["split"] = (
            "train" if src.group in train_groups else "val" if src.group in val_groups else "unused"
        )
        if faces is not None:
            row["faces"] = sum(1 for f in faces if f.source == src.source)
        if frames is not None:
            row["frames_used"] = sum(1 for f in frames if f.source == src.source)
        rows.append(row)
    unit = "faces" if faces is not None else "frames"
    return {
        "sources": rows,
        "skipped": [{"source": s, "reason": r} for s, r in real.skipped],
        "counts": {
            "source_files": len(real.sources),
            "frames": len(real.frames),
            **({"faces": len(faces)} if faces is not None else {}),
            f"train_{unit}": len(train),
            f"val_{unit}": len(val),
            "train_groups": len(train_groups),
            "val_groups": len(val_groups),
        },
    }


@contextmanager
def _deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seeded torch RNGs, deterministic kernels and (on CPU) a fixed thread count, all
    restored afterwards so a caller's own settings survive a training run."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            torch.manual_seed(seed)
            if device.type == "cpu":
                torch.set_num_threads(CPU_THREADS)
                torch.use_deterministic_algorithms(True)
            else:
                # cuBLAS needs an environment variable set before CUDA starts to be fully
                # deterministic; warn rather than fail on a GPU where it is not set.
                torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * (step - recipe.warmup_steps) / span))


def _run(
    name: str,
    make_net: Callable[[], SbiFaceNet | FingerprintNet],
    input_shape: tuple[int, int, int],
    batch: Callable[[np.random.Generator], Scored],
    validation: Callable[[np.random.Generator], Scored],
    out: Path,
    *,
    seed: int,
    recipe: Recipe,
    device: str | None,
    data: dict[str, Any],
    started: float,
    method: dict[str, Any],
) -> TrainReport:
    if recipe.steps < 1 or recipe.batch_pairs < 1:
        raise ValueError("steps and batch_pairs must be positive")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Independent streams for training batches and the validation set, so changing the
    # step count never changes the validation images.
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    train_rng, val_rng = np.random.default_rng(train_seq), np.random.default_rng(val_seq)
    val_images, val_labels = validation(val_rng)
    with _deterministic(seed, dev):
        net = make_net().to(dev)
        optimiser = torch.optim.AdamW(
            net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        loss_fn = nn.BCEWithLogitsLoss()
        every = max(1, recipe.steps // 20)
        checks = {
            round(recipe.steps * (i + 1) / recipe.checkpoints) for i in range(recipe.checkpoints)
        }
        curve: list[dict[str, float]] = []
        window_loss: list[float] = []
        window_acc: list[float] = []
        train_started = time.monotonic()
        net.train()
        for step in range(recipe.steps):
            images, labels = batch(train_rng)
            x = to_tensor(images).to(dev)
            y = torch.tensor(labels, dtype=torch.float32, device=dev)
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(step, recipe)
            logits = net.logits(x)
            loss = loss_fn(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window_loss.append(float(loss.detach()))
            window_acc.append(float(((logits.detach() > 0).float() == y).float().mean()))
            done = step + 1
            if done % every == 0 or done in checks:
                point: dict[str, float] = {
                    "step": done,
                    "loss": round(float(np.mean(window_loss)), 5),
                    "train_acc": round(float(np.mean(window_acc)), 4),
                    "elapsed_s": round(time.monotonic() - train_started, 1),
                }
                window_loss, window_acc = [], []
                if done in checks:
                    point["val_auc"] = round(roc_auc(val_labels, score(net, val_images)), 5)
                curve.append(point)
                log.info(f"{name} step", **point)
        train_time = time.monotonic() - train_started
        val_scores = score(net, val_images)
    val_auc = roc_auc(val_labels, val_scores)
    weights_sha = _save(net, out / f"{name}.pt")
    wall = time.monotonic() - started
    device_name = str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    details = {
        "name": name,
        "architecture": type(net).__name__,
        "input": {
            "shape": [*input_shape],
            "dtype": "float32",
            "range": "[0, 1] RGB, NCHW",
            "output": "synthetic score in [0, 1], shape (N,)",
        },
        "parameters": sum(p.numel() for p in net.parameters()),
        "weight_bytes": weight_bytes(net),
        "seed": seed,
        "recipe": {
            **asdict(recipe),
            "optimiser": "AdamW",
            "loss": "BCE with logits, real 0, fake 1",
            "schedule": "linear warm-up, cosine decay to 0",
            **method,
        },
        "data": data,
        "curve": curve,
        "validation": {
            "auc": round(val_auc, 5),
            "pairs": len(val_labels) // 2,
            "what": "held-out source groups: their reals vs their pseudo-fakes",
            "real_score_mean": round(_mean(val_scores, val_labels, 0), 5),
            "fake_score_mean": round(_mean(val_scores, val_labels, 1), 5),
        },
        "wall_time_s": round(wall, 1),
        "train_time_s": round(train_time, 1),
        "device": device_name,
        "threads": CPU_THREADS if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "weights_file": f"{name}.pt",
        "weights_sha256": weights_sha,
    }
    report = out / f"{name}.json"
    report.write_text(json.dumps(details, indent=2) + "\n")
    log.info(f"{name} done", val_auc=round(val_auc, 4), wall_time_s=round(wall, 1))
    return TrainReport(
        name=name,
        weights=out / f"{name}.pt",
        report=report,
        weights_sha256=weights_sha,
        val_auc=val_auc,
        wall_time_s=wall,
        device=device_name,
        details=details,
    )


def _mean(scores: Sequence[float], labels: Sequence[int], label: int) -> float:
    picked = [s for s, y in zip(scores, labels, strict=True) if y == label]
    return float(np.mean(picked)) if picked else float("nan")


def _save(net: nn.Module, path: Path) -> str:
    """Write the float32 state dict (on CPU) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return file_sha256(path)
