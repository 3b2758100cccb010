"""The runtime's evidence heatmaps against Grad-CAM, the maps they replaced.

The scan path no longer imports torch, so evidence heatmaps come from forward passes of
the backend that scored the item (`synthwatch/operators/heatmap.py`) where they used to
be Grad-CAM (`gradcam.py` here, torch autograd). This measures how close the
replacement comes to the old maps and what it costs, on real media from
../shared/media/dev, for the face model `sbi_face` and the whole-image model
`fingerprint` (bundled weights), and the alternatives the runtime's maps were chosen
over:

- face crops: faces found by the engine's face detector (`load_face_detector`: MTCNN)
  in frames sampled from the dev clips, stills and animations (fake and real), cut as
  the explainer cuts them (`crop_faces`, 1.3x the box, 128 px); where no face is found,
  the centre square resized to 128 (the notes name them). Runtime map: occlusion
  (Zeiler & Fergus, ECCV 2014) with a blurred 1/8 occluder; alternatives: RISE
  (Petsiuk et al., BMVC 2018), occlusion with the other fills, and in the full run
  occluders of 1/4 and 1/16 of the side and other RISE settings;
- frames: the first frame of the dev clips, then the dev stills (`images/`), as the
  square the explainer covers (`explainer.frame_view`: centred, native resolution, at
  most 512 px, a multiple of the 64 px patch). Grad-CAM runs on the whole square, as it
  did. Runtime map: each patch left out of the mean in turn (`heatmap.patch_occlusion`);
  alternatives: occluders painted over the square, scored patch by patch (`patch_mean`).

Per map pair: Pearson and Spearman correlation over pixels, and the IoU of the two
maps' top-20% regions (two random 20% regions: 0.11 expected); medians over items.
"other item": each item's map against the next item's Grad-CAM map, what a map gets
without being about the item (Grad-CAM's own row: how alike two items' Grad-CAM maps
are); "centre prior": a centred Gaussian. "drop top 20%" (faces): the mean fall of the
score when the map's top-20% region is flat grey, whether a map points at what the score
depends on. "raised": the share of non-overlapping 1/8 windows whose fill raised the
score instead of lowering it.

Times: each method once per item, interleaved on the same item: Grad-CAM on torch (as
the explainer ran it), the runtime's map on ONNX Runtime (as the runtime runs it) and
on torch (Grad-CAM's backend); the ratio is the median over items of the method's time
/ Grad-CAM's time on that item. `--quick`: 8 faces, 4 frames, the runtime's maps,
RISE and the occlusion fills; the full run: 24 faces, 20 frames, every variant.

    python -m benchmarks.bench_heatmaps [--quick]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks._common import ROOT, Report, timed

THREADS = 2
"""`Settings.models.threads`: the pipeline's default, one per core of this machine."""
FACE_MODEL = "sbi_face"
FRAME_MODEL = "fingerprint"
PATCH = 64
"""fingerprint's patch (`FINGERPRINT_PATCH`): the frame squares are multiples of it."""
TOP = 0.2
MEDIA = (ROOT / ".." / "shared" / "media" / "dev").resolve()

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Scorer = Callable[[F32], F32]


def _model_dir() -> Path:
    env = os.environ.get("SYNTHWATCH_MODEL_DIR")
    return Path(env) if env else (ROOT / ".." / "shared" / "weights").resolve()


@dataclass
class Item:
    model: str
    label: str
    source: str
    how: str
    image: U8
    """What is explained: the face crop or the frame square, uint8 HxWx3."""
    maps: dict[str, F32] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    drops: dict[str, float] = field(default_factory=dict)
    raised: dict[str, float] = field(default_factory=dict)

    @property
    def x(self) -> F32:
        out: F32 = np.ascontiguousarray(self.image.astype(np.float32).transpose(2, 0, 1) / 255)
        return out


# --- media ---------------------------------------------------------------------------


def _labelled(*under: str) -> list[tuple[Path, str]]:
    with (MEDIA / "labels.csv").open() as fh:
        rows = [(MEDIA / r["path"], r["label"]) for r in csv.DictReader(fh)]
    return [r for top in under for r in rows if r[0].relative_to(MEDIA).parts[0] == top]


def _first_frames(path: Path, frames: int) -> list[U8]:
    from synthwatch.operators.sample import SampleSettings, sample

    got = sample(path, SampleSettings(frames=frames, audio=False)).frames[:frames]
    return [np.ascontiguousarray(f.image) for f in got]


def face_items(store: Any, per_label: int, frames_per_clip: int) -> tuple[list[Item], list[str]]:
    from synthwatch.operators import faces as faces_op
    from synthwatch.operators.score import CROP_SCALE
    from synthwatch.pipeline.engine import load_face_detector
    from synthwatch.pipeline.settings import ModelSettings

    size = store.spec(FACE_MODEL).input_shape[-1]
    notes: list[str] = []
    detector: Any = None
    try:
        detector, name = load_face_detector(store, ModelSettings())
        notes.append(f"faces: found by the engine's face detector ({name})")
    except Exception as exc:  # the detector may be unavailable: centre crops still measure
        notes.append(f"faces: no face detector ({exc}); centre crops resized to {size}")
    items: list[Item] = []
    counts = {"fake": 0, "real": 0}
    for path, label in _labelled("fake", "real"):
        if counts[label] >= per_label:
            continue
        images = _first_frames(path, frames_per_clip)
        found = detector.detect(images) if detector is not None else [[] for _ in images]
        for image, dets in zip(images, found, strict=True):
            if counts[label] >= per_label:
                break
            crops = faces_op.crop_faces(image, list(dets[:1]), scale=CROP_SCALE, size=size)
            if crops:
                crop, how = crops[0].image, "detected"
            else:
                h, w = image.shape[:2]
                side = min(h, w)
                y0, x0 = (h - side) // 2, (w - side) // 2
                square = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
                crop = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))
                how = "centre crop"
            items.append(Item(FACE_MODEL, label, path.name, how, crop))
            counts[label] += 1
    centre = sorted({i.source for i in items if i.how == "centre crop"})
    if centre:
        n = sum(i.how == "centre crop" for i in items)
        notes.append(f"faces: {n} of {len(items)} are centre crops (no face found): {centre}")
    return items, notes


def frame_items(per_label: int) -> list[Item]:
    from synthwatch.operators.explainer import frame_view

    items: list[Item] = []
    counts = {"fake": 0, "real": 0}
    for path, label in _labelled("fake", "real", "images"):
        if counts[label] >= per_label:
            continue
        square, _, by_patch = frame_view(_first_frames(path, 1)[0], PATCH, "patches")
        if by_patch and square.shape[0] >= 2 * PATCH:
            items.append(Item(FRAME_MODEL, label, path.name, "square", square))
            counts[label] += 1
    return items


# --- maps ----------------------------------------------------------------------------


def patch_mean(score: Scorer, tile: int, reference: F32, *, max_batch: int = 32) -> Scorer:
    """A scorer of (N, 3, H, W) images as the mean score of their `tile` x `tile` tiles,
    as the pipeline scores a frame with a patch model; `score` sees only tiles. A tile
    equal to `reference`'s tile at that place reuses its score, so an occluded copy
    costs the few tiles the occluder touches."""
    rows, cols = reference.shape[1] // tile, reference.shape[2] // tile

    def tiles(x: F32) -> F32:
        n, c = x.shape[0], x.shape[1]
        out: F32 = x.reshape(n, c, rows, tile, cols, tile).transpose(0, 2, 4, 1, 3, 5)
        return out

    def run(batch: F32) -> npt.NDArray[np.float64]:
        out = np.empty(len(batch), dtype=np.float64)
        for i in range(0, len(batch), max_batch):
            out[i : i + max_batch] = score(np.ascontiguousarray(batch[i : i + max_batch]))
        return out

    ref = tiles(np.ascontiguousarray(reference)[None])[0]
    ref_scores = run(ref.reshape(rows * cols, 3, tile, tile)).reshape(rows, cols)

    def scorer(batch: F32) -> F32:
        t = tiles(batch)
        changed = (t != ref[None]).any(axis=(3, 4, 5))
        per_tile = np.broadcast_to(ref_scores, changed.shape).copy()
        if changed.any():
            per_tile[changed] = run(t[changed])
        out: F32 = per_tile.mean(axis=(1, 2)).astype(np.float32)
        return out

    return scorer


def _resized(heat: F32, shape: tuple[int, ...]) -> F32:
    if heat.shape == shape:
        return heat
    big = Image.fromarray(heat, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.float32)


def centre_prior(h: int, w: int) -> F32:
    yy, xx = np.mgrid[0:h, 0:w]
    sigma = min(h, w) / 4
    out: F32 = np.exp(
        -(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * sigma**2))
    ).astype(np.float32)
    return out


def raised_share(score: Scorer, x: F32, fill: str) -> float:
    """Share of non-overlapping 1/8 windows whose fill raised the score."""
    from synthwatch.operators import heatmap

    side = max(1, min(x.shape[1:]) // heatmap.PATCH_FRACTION)
    filler = heatmap._filler(x, fill, side)  # type: ignore[arg-type]
    wins = [
        (y, z)
        for y in range(0, x.shape[1] - side + 1, side)
        for z in range(0, x.shape[2] - side + 1, side)
    ]
    batch = np.repeat(x[None], len(wins), axis=0)
    for j, (y, z) in enumerate(wins):
        batch[j, :, y : y + side, z : z + side] = filler[:, y : y + side, z : z + side]
    base = float(score(x[None])[0])
    got = np.concatenate([score(batch[i : i + 32]) for i in range(0, len(batch), 32)])
    return float((got > base + 1e-6).mean())


# --- metrics -------------------------------------------------------------------------


def pearson(a: F32, b: F32) -> float | None:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(a: F32, b: F32) -> float | None:
    from scipy.stats import rankdata

    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def top_region(a: F32) -> npt.NDArray[np.bool_]:
    """The map's hottest 20% of pixels (fewer where fewer are above zero)."""
    out: npt.NDArray[np.bool_] = (a >= np.quantile(a, 1.0 - TOP)) & (a > 0)
    return out


def iou(a: F32, b: F32) -> float | None:
    ra, rb = top_region(a), top_region(b)
    if not ra.any() or not rb.any():
        return None
    return float((ra & rb).sum() / (ra | rb).sum())


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


# --- the run -------------------------------------------------------------------------


@dataclass
class Method:
    key: str
    label: str
    model: str
    make: Callable[[Item, Scorer], F32]
    backend: str = "ort"
    timed_only: bool = False
    """The runtime's map on a second backend: its time, not its map (the same map)."""
    fill: str = ""


def _face(fill: str, fraction: int | None = None) -> Callable[[Item, Scorer], F32]:
    from synthwatch.operators import heatmap

    def make(item: Item, score: Scorer) -> F32:
        x = item.x
        patch = None if fraction is None else max(1, round(x.shape[1] / fraction))
        return heatmap.occlusion(score, x, fill=fill, patch=patch)  # type: ignore[arg-type]

    return make


def _frame_runtime(item: Item, score: Scorer) -> F32:
    from synthwatch.operators import heatmap

    return heatmap.patch_occlusion(score, item.x, PATCH)


def _frame_fill(fill: str) -> Callable[[Item, Scorer], F32]:
    from synthwatch.operators import heatmap

    def make(item: Item, score: Scorer) -> F32:
        x = item.x
        return heatmap.occlusion(patch_mean(score, PATCH, x), x, fill=fill)  # type: ignore[arg-type]

    return make


def _face_rise(
    masks: int, seed: int = 0, cells: int = 8, fill: str = "grey"
) -> Callable[[Item, Scorer], F32]:
    from synthwatch.operators import heatmap

    def make(item: Item, score: Scorer) -> F32:
        return heatmap.rise(score, item.x, masks=masks, seed=seed, cells=cells, fill=fill)  # type: ignore[arg-type]

    return make


def methods(full: bool) -> list[Method]:
    """What is measured: the runtime's map for each model (on ONNX Runtime, and timed on
    torch), then the alternatives it was chosen over."""
    from synthwatch.operators import heatmap

    masks = heatmap.RISE_MASKS
    occ, rise = heatmap.OCCLUSION_FILL, heatmap.RISE_FILL
    face_fills = [occ, *(f for f in ("blur", "grey", "mean") if f != occ)]
    out = [
        Method("runtime", f"occlusion {occ} 1/8 (ORT): runtime", FACE_MODEL, _face(occ)),
        Method(
            "runtime_torch",
            f"occlusion {occ} 1/8 (torch)",
            FACE_MODEL,
            _face(occ),
            backend="torch",
            timed_only=True,
        ),
        Method(f"rise_{masks}", f"RISE {masks} {rise} (ORT)", FACE_MODEL, _face_rise(masks)),
        *(
            Method(f"fill_{f}", f"occlusion {f} 1/8 (ORT)", FACE_MODEL, _face(f), fill=f)
            for f in face_fills
            if f != occ and (full or f != "mean")
        ),
        Method("runtime", "patches left out (ORT): runtime", FRAME_MODEL, _frame_runtime),
        Method(
            "runtime_torch",
            "patches left out (torch)",
            FRAME_MODEL,
            _frame_runtime,
            backend="torch",
            timed_only=True,
        ),
        *(
            Method(f"fill_{f}", f"occlusion {f} 1/8 (ORT)", FRAME_MODEL, _frame_fill(f), fill=f)
            for f in ("grey", "blur")
            if full or f == "grey"
        ),
    ]
    if full:
        out += [
            Method(f"patch_1_{k}", f"occlusion {occ} 1/{k} (ORT)", FACE_MODEL, _face(occ, k))
            for k in (4, 16)
        ]
        out += [
            Method(f"rise_{n}", f"RISE {n} {rise} (ORT)", FACE_MODEL, _face_rise(n))
            for n in (250, 2000)
        ]
        out += [
            Method(
                f"rise_{f}",
                f"RISE {masks} {f} (ORT)",
                FACE_MODEL,
                _face_rise(masks, fill=f),
            )
            for f in ("blur", "grey", "mean")
            if f != rise
        ]
        out += [
            Method(
                f"rise_cells_{c}",
                f"RISE {masks} {rise}, {c} cells (ORT)",
                FACE_MODEL,
                _face_rise(masks, cells=c),
            )
            for c in (6, 12)
        ]
        out.append(
            Method(
                "rise_seed1",
                f"RISE {masks} {rise}, other masks (ORT)",
                FACE_MODEL,
                _face_rise(masks, seed=1),
            )
        )
    return out


def explain(items: list[Item], store: Any, chosen: list[Method]) -> None:
    import torch

    from benchmarks.gradcam import grad_cam
    from synthwatch.operators.infer import OnnxRuntimeBackend, TorchBackend

    torch.set_num_threads(THREADS)
    for model in (FACE_MODEL, FRAME_MODEL):
        mine = [i for i in items if i.model == model]
        if not mine:
            continue
        module = store.load_torch(model)
        scorers: dict[str, Scorer] = {
            "torch": TorchBackend(module).run,
            "ort": OnnxRuntimeBackend(store.onnx_path(model), threads=THREADS).run,
        }
        ours = [m for m in chosen if m.model == model]
        # Every path once before timing (first calls allocate and pick kernels).
        grad_cam(module, mine[0].x[None])
        for m in ours:
            if m.key.startswith("runtime"):
                m.make(mine[0], scorers[m.backend])
        for n, item in enumerate(mine):
            print(f"{model} {n + 1}/{len(mine)}: {item.label} {item.source}", flush=True)
            x = item.x
            cam, t = timed(partial(grad_cam, module, x[None]))
            item.maps["gradcam"], item.times["gradcam"] = cam[0], t.wall_s
            for m in ours:
                heat, t = timed(partial(m.make, item, scorers[m.backend]))
                item.times[m.key] = t.wall_s
                if not m.timed_only:
                    item.maps[m.key] = heat
            score = scorers["ort"] if model == FACE_MODEL else patch_mean(scorers["ort"], PATCH, x)
            item.score = float(score(x[None])[0])
            for m in ours:
                if m.fill:
                    item.raised[m.key] = raised_share(score, x, m.fill)
            if model == FACE_MODEL:
                # Deletion: the score with each map's top-20% region flat grey.
                regions = {k: top_region(v) for k, v in item.maps.items()}
                regions["centre"] = top_region(centre_prior(*x.shape[1:]))
                hidden = np.repeat(x[None], len(regions), axis=0)
                for j, region in enumerate(regions.values()):
                    hidden[j][:, region] = 0.5
                got = score(hidden)
                item.drops = {k: item.score - float(v) for k, v in zip(regions, got, strict=True)}


COLUMNS = [
    "model",
    "map",
    "maps",
    "pearson",
    "pearson, other item",
    "spearman",
    "IoU top 20%",
    "IoU, other item",
    "drop top 20%",
    "raised",
    "ms/map",
    "time vs Grad-CAM",
]


def agreement(maps: Sequence[F32], mine: Sequence[Item]) -> dict[str, Any]:
    """Each item's map against its Grad-CAM map, and against the next item's Grad-CAM
    map (`other item`: how much of the agreement any item's map would get)."""
    cams = [i.maps["gradcam"] for i in mine]
    n = len(cams)
    r = [pearson(a, c) for a, c in zip(maps, cams, strict=True)]
    out: dict[str, Any] = {
        "pearson": _median(r),
        "spearman": _median([spearman(a, c) for a, c in zip(maps, cams, strict=True)]),
        "IoU top 20%": _median([iou(a, c) for a, c in zip(maps, cams, strict=True)]),
        "pearson_fake": _median([v for v, i in zip(r, mine, strict=True) if i.label == "fake"]),
        "pearson_real": _median([v for v, i in zip(r, mine, strict=True) if i.label == "real"]),
        "empty_maps": sum(not a.any() for a in maps),
        "pearson_items": r,
    }
    if n > 1:
        other = [_resized(maps[(k + 1) % n], cams[k].shape) for k in range(n)]
        out["pearson, other item"] = _median(
            [pearson(a, c) for a, c in zip(other, cams, strict=True)]
        )
        out["IoU, other item"] = _median([iou(a, c) for a, c in zip(other, cams, strict=True)])
    return out


def rows_for(model: str, mine: list[Item], chosen: list[Method]) -> list[dict[str, Any]]:
    face = model == FACE_MODEL
    cams = [i.maps["gradcam"] for i in mine]
    rows: list[dict[str, Any]] = [
        {
            "model": model,
            "map": "Grad-CAM (torch): before",
            "maps": len(mine),
            "drop top 20%": statistics.mean(i.drops["gradcam"] for i in mine) if face else None,
            "ms/map": statistics.median(i.times["gradcam"] for i in mine) * 1000,
            "time vs Grad-CAM": "1",
            "scores": [[f"{i.label}/{i.source}", round(i.score, 4)] for i in mine],
        }
        | {k: v for k, v in agreement(cams, mine).items() if "other" in k}
    ]
    for m in (m for m in chosen if m.model == model):
        ratios = [i.times[m.key] / i.times["gradcam"] for i in mine]
        row: dict[str, Any] = {
            "model": model,
            "map": m.label,
            "key": m.key,
            "ms/map": statistics.median(i.times[m.key] for i in mine) * 1000,
            "time vs Grad-CAM": f"{statistics.median(ratios):.1f}x",
            "time_ratio": statistics.median(ratios),
        }
        if not m.timed_only:
            row["maps"] = len(mine)
            row |= agreement([i.maps[m.key] for i in mine], mine)
            if face:
                row["drop top 20%"] = statistics.mean(i.drops[m.key] for i in mine)
            if m.key != "runtime":
                row["pearson_vs_runtime"] = _median(
                    [pearson(i.maps[m.key], i.maps["runtime"]) for i in mine]
                )
        if m.fill:
            row["raised"] = f"{statistics.mean(i.raised[m.key] for i in mine):.0%}"
        rows.append(row)
    prior = [centre_prior(*c.shape) for c in cams]
    rows.append(
        {
            "model": model,
            "map": "baseline: centre prior",
            "maps": len(mine),
            "drop top 20%": statistics.mean(i.drops["centre"] for i in mine) if face else None,
        }
        | agreement(prior, mine)
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_heatmaps")
    parser.add_argument("--quick", action="store_true", help="8 faces, 4 frames, fewer variants")
    args = parser.parse_args(argv)
    quick = bool(args.quick)

    from synthwatch.models.registry import ModelStore

    t0 = time.perf_counter()
    store = ModelStore(_model_dir())
    faces, notes = face_items(
        store, per_label=4 if quick else 12, frames_per_clip=1 if quick else 3
    )
    items = faces + frame_items(per_label=2 if quick else 10)
    chosen = methods(full=not quick)
    explain(items, store, chosen)

    report = Report(
        name="heatmaps",
        title=(
            "Runtime heatmaps vs Grad-CAM: agreement with Grad-CAM (medians over items) and "
            f"time per map, {THREADS} threads"
        ),
        columns=COLUMNS,
        params={
            "quick": quick,
            "threads": THREADS,
            "top": TOP,
            "model_dir": str(_model_dir()),
            "media": str(MEDIA),
            "items": {
                m: [f"{i.label}/{i.source} ({i.how})" for i in items if i.model == m]
                for m in (FACE_MODEL, FRAME_MODEL)
            },
        },
        notes=notes,
    )
    for model in (FACE_MODEL, FRAME_MODEL):
        mine = [i for i in items if i.model == model]
        if mine:
            report.rows += rows_for(model, mine, chosen)
    seed = next((r for r in report.rows if r.get("key") == "rise_seed1"), None)
    if seed is not None:
        report.notes.append(
            f"RISE with other random masks vs the runtime's occlusion map: median Pearson "
            f"{seed['pearson_vs_runtime']:.2f}"
        )
    report.notes += [
        "other item: each item's map against the next item's Grad-CAM map (Grad-CAM's row: "
        "two items' Grad-CAM maps), what a map agrees with Grad-CAM without being about "
        "the item",
        "Grad-CAM's map: 8x8 cells on a 128 px face crop, 1/8 of the side on a frame "
        "square, upsampled; occlusion's: 15x15 windows of 1/8 of the side; RISE's: 8x8 "
        "cells, shifted",
        "drop top 20% is measured on faces only: on frames any flat or blurred region "
        "raises fingerprint's score (column raised), so greying a region says nothing there",
        "times: wall seconds on a 2-core machine that other work shares, each method once "
        "per item, interleaved with Grad-CAM on the same item; compare the ratios",
    ]
    report.params["elapsed_s"] = round(time.perf_counter() - t0, 1)
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
