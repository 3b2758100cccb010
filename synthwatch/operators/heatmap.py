"""Heatmaps: where in a face crop or frame a detector saw the fake, from forward passes only.

Every map here needs nothing from the model but its scores, so it runs on whatever
backend scored the item (ONNX Runtime, TensorRT, torch) and never needs gradients, hooks
or a torch module: the scan path explains a verdict with the very weights and runtime
that made it. They replace Grad-CAM (Selvaraju et al., ICCV 2017), which needed torch
autograd; benchmarks/bench_heatmaps.py measures them against it on the dev set.

- `occlusion`: occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding
  Convolutional Networks", ECCV 2014, section 4.2): hide one square of the input at a
  time and record how much the synthetic score drops.
- `rise`: RISE (Petsiuk, Das & Saenko, BMVC 2018): score many copies with random halves
  of the input hidden, and credit each pixel with the score of the copies that kept it.
  The explainer draws it for a scene model's view. On the dev set's faces with sbi_face
  it agreed with the Grad-CAM maps better than occlusion did (median Pearson 0.46 vs
  0.29, top-20% IoU 0.33 vs 0.23) but was less faithful to the score (hiding a map's top
  fifth lowered it by 0.14, against occlusion's 0.26 and Grad-CAM's 0.17) at 2.6x the
  time, so face crops get `occlusion`: evidence should show what moved the score.
- `patch_occlusion`: occlusion for the models that score a frame as the mean of its
  patches (fingerprint), by leaving patches out of the mean instead of painting over
  them; the explainer draws it for their frames.

A heatmap is an explanation for an analyst, not a localisation the detector was trained
to give: a model that keys on blending boundaries lights up the face's edge, which is
itself informative.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

Scorer = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
"""A batch scorer: (N, C, H, W) float32 in [0, 1] -> (N,) synthetic scores."""

Fill = Literal["blur", "grey", "mean"]
OCCLUSION_FILL: Fill = "blur"
"""`occlusion`'s default fill (its docstring says why)."""
RISE_FILL: Fill = "grey"
"""`rise`'s default fill: the paper's hidden cells show a constant; the dev faces
measured blur and mean no better (benchmarks/bench_heatmaps.py)."""

PATCH_FRACTION = 8
"""The occluder's side is the input's shorter side over this (16 px on a 128 px face
crop), moved by half its side: 15 x 15 = 225 occluded copies, whatever the input size.
Why 1/8: on a face crop (the face box enlarged 1.3x) an eye, a mouth corner or a stretch
of the blending boundary is 1/8 to 1/6 of the crop's side, the scale of the evidence the
face models use, and the Grad-CAM maps this replaces are 8 x 8 grids (the face models'
last convolution is 1/16 of the input) that 1/8 with a half stride resolves as finely.
Measured (sbi_face, dev faces, median Pearson with Grad-CAM): 1/4 0.28 (a 7 x 7 map,
49 copies), 1/8 0.29, 1/16 0.17 (961 copies, and a square too small to move a score
whose evidence is spread over the face)."""

MAX_BATCH = 32
"""Occluded copies per scorer call, at most (fewer for large inputs: `MAX_BATCH_BYTES`)."""
MAX_BATCH_BYTES = 64 << 20
"""The occluded copies of one scorer call stay under this many bytes: 21 copies of a
512 x 512 frame square, the full 32 of a face crop."""
MIN_DROP = 1e-6
"""A map whose largest score drop is at most this is all zeros: no region holds
evidence, and normalising float noise to 1 would draw a map of nothing."""


def _starts(length: int, patch: int, stride: int) -> list[int]:
    """Window origins along one axis: every `stride`, plus one flush with the far edge so
    every pixel is covered."""
    last = length - patch
    out = list(range(0, last + 1, stride))
    if out[-1] != last:
        out.append(last)
    return out


def _box_blur(image: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Mean over a `size` x `size` window around each pixel (edges reflected), per channel."""
    if size <= 1:
        return image.copy()
    lo = size // 2
    hi = size - 1 - lo
    padded = np.pad(image.astype(np.float64), ((0, 0), (lo, hi), (lo, hi)), mode="reflect")
    c = np.cumsum(np.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
    rows = c[:, size:, :] - c[:, :-size, :]
    c = np.cumsum(np.pad(rows, ((0, 0), (0, 0), (1, 0))), axis=2)
    out = (c[:, :, size:] - c[:, :, :-size]) / float(size * size)
    return out.astype(np.float32)


def _filler(image: npt.NDArray[np.float32], fill: Fill, patch: int) -> npt.NDArray[np.float32]:
    """What an occluded square shows instead of the input, at the input's shape."""
    if fill == "grey":
        return np.full_like(image, 0.5)
    if fill == "mean":
        return np.broadcast_to(image.mean(axis=(1, 2), keepdims=True), image.shape).astype(
            np.float32
        )
    if fill == "blur":
        return _box_blur(image, patch)
    raise ValueError(f"unknown fill {fill!r} (blur, grey or mean)")


def _scores(score: Scorer, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    out = np.asarray(score(batch), dtype=np.float64).reshape(-1)
    if out.shape != (len(batch),):
        raise ValueError(f"the scorer gave {out.shape[0]} scores for a batch of {len(batch)}")
    if not np.isfinite(out).all():
        raise ValueError("the scorer gave a non-finite score")
    return out


def _window_heat(
    shape: tuple[int, int],
    windows: list[tuple[int, int]],
    size: tuple[int, int],
    drops: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """Each pixel's mean positive drop over the windows that cover it, scaled to a peak
    of 1; all zeros when no window's drop exceeds `MIN_DROP`."""
    if drops.max(initial=0.0) <= MIN_DROP:
        return np.zeros(shape, dtype=np.float32)
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    (h, w) = size
    for (y, x), drop in zip(windows, drops, strict=True):
        total[y : y + h, x : x + w] += max(float(drop), 0.0)
        count[y : y + h, x : x + w] += 1.0
    heat = total / np.maximum(count, 1.0)
    out: npt.NDArray[np.float32] = (heat / heat.max()).astype(np.float32)
    return out


def occlusion(
    score: Scorer,
    image: npt.NDArray[np.float32],
    *,
    patch: int | None = None,
    stride: int | None = None,
    fill: Fill = OCCLUSION_FILL,
    max_batch: int = MAX_BATCH,
) -> npt.NDArray[np.float32]:
    """Occlusion-sensitivity map of `score` on one (3, H, W) float32 image in [0, 1].

    Slides a `patch` x `patch` occluder over the image every `stride` pixels (defaults:
    `PATCH_FRACTION` of the shorter side, half of that), scoring the occluded copies in
    batches of at most `max_batch` (and `MAX_BATCH_BYTES`) together with the original.
    A window's heat is how far hiding it lowers the score (its positive part: hiding
    evidence against a fake is not evidence for one); a pixel's heat is the mean over
    the windows that cover it. Returns (H, W) float32 in [0, 1], scaled so the hottest
    pixel is 1, or all zeros when no window lowers the score by more than `MIN_DROP`.

    `fill`: what the occluder shows. `blur` (default): the image box-blurred over the
    occluder's size, which removes the fine detail the detectors read (blending seams,
    up-sampling traces) but keeps the region's colour and shading. `grey`: a flat 0.5
    square, Zeiler & Fergus's occluder. `mean`: the image's mean colour. A flat square
    brings sharp edges of its own, which the face model reads as a blend: with sbi_face
    on the dev faces grey and mean squares raised the score in 63% and 61% of windows,
    blur in 48%, and blur's maps agreed best with Grad-CAM (median Pearson 0.29; grey
    0.23, mean 0.16).

    Raises ValueError for an image that is not (3, H, W), for bad sizes, or for a scorer
    that returns the wrong number of scores or a non-finite one.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {image.shape}")
    height, width = int(image.shape[1]), int(image.shape[2])
    image = np.ascontiguousarray(image, dtype=np.float32)
    side = patch if patch is not None else max(1, round(min(height, width) / PATCH_FRACTION))
    step = stride if stride is not None else max(1, side // 2)
    if side < 1 or step < 1 or max_batch < 1:
        raise ValueError(f"patch, stride and max_batch must be >= 1 ({side}, {step}, {max_batch})")
    ph, pw = min(side, height), min(side, width)
    windows = [(y, x) for y in _starts(height, ph, step) for x in _starts(width, pw, step)]
    filler = _filler(image, fill, side)
    per_batch = max(1, min(max_batch, MAX_BATCH_BYTES // max(1, image.nbytes)))

    # The original rides in the first batch: one scorer call fewer.
    base = np.nan
    drops = np.empty(len(windows), dtype=np.float64)
    todo: list[tuple[int, int] | None] = [None, *windows]
    done = 0
    for start in range(0, len(todo), per_batch):
        chunk = todo[start : start + per_batch]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for j, win in enumerate(chunk):
            if win is not None:
                y, x = win
                batch[j, :, y : y + ph, x : x + pw] = filler[:, y : y + ph, x : x + pw]
        got = _scores(score, batch)
        if chunk[0] is None:
            base, got = float(got[0]), got[1:]
        drops[done : done + len(got)] = base - got
        done += len(got)

    return _window_heat((height, width), windows, (ph, pw), drops)


RISE_MASKS = 500
"""Random masks per RISE map. Measured on the dev set's faces with sbi_face (median
Pearson with Grad-CAM, benchmarks/bench_heatmaps.py): 250 masks 0.27, 500 0.46, 2000
0.48 at 4x the cost. The estimate is noisy: two sets of 500 masks give maps of one face
that correlate at 0.66, which is why the masks come from a fixed seed."""
RISE_CELLS = 8
"""A RISE mask is a `RISE_CELLS` x `RISE_CELLS` grid of kept or hidden cells, smoothed:
cells of 1/8 of the side, the scale `PATCH_FRACTION` argues for. Measured as above:
6 cells 0.38, 8 cells 0.46, 12 cells 0.33."""


def _rise_masks(
    rng: np.random.Generator, n: int, height: int, width: int, cells: int, keep: float
) -> npt.NDArray[np.float32]:
    """`n` smooth (height, width) masks in [0, 1]: a random (cells + 1)-square grid of
    kept cells, upsampled bilinearly and shifted by a random fraction of a cell, so that
    cell edges fall anywhere (Petsiuk et al., section 3.2)."""
    ch, cw = -(-height // cells), -(-width // cells)
    grids = (rng.random((n, cells + 1, cells + 1)) < keep).astype(np.float32)
    shifts = rng.integers(0, (ch, cw), size=(n, 2))
    out = np.empty((n, height, width), dtype=np.float32)
    for i in range(n):
        big = Image.fromarray(grids[i], mode="F").resize(
            ((cells + 1) * cw, (cells + 1) * ch), Image.Resampling.BILINEAR
        )
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = np.asarray(big, dtype=np.float32)[dy : dy + height, dx : dx + width]
    return out


def rise(
    score: Scorer,
    image: npt.NDArray[np.float32],
    *,
    masks: int = RISE_MASKS,
    cells: int = RISE_CELLS,
    keep: float = 0.5,
    fill: Fill = RISE_FILL,
    seed: int = 0,
    max_batch: int = MAX_BATCH,
) -> npt.NDArray[np.float32]:
    """RISE map of `score` on one (3, H, W) float32 image in [0, 1] (Petsiuk, Das and
    Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC
    2018): score `masks` copies of the image, each keeping a random half of a coarse grid
    of cells (smoothly; the rest shows `fill`, as `occlusion` defines it), in batches of
    at most `max_batch` (and `MAX_BATCH_BYTES`). A pixel's heat is the mean score of the
    copies that kept it, weighted by how much of it they kept, less the mean score of
    all copies: how much its presence raises the synthetic score (positive part).
    Returns (H, W) float32 in [0, 1], the hottest pixel 1, or all zeros when no pixel
    raises the score by more than `MIN_DROP`. `seed` fixes the masks: the same image
    and scorer give the same map.

    Where occlusion hides one region of an otherwise intact input, RISE hides half the
    input at a time, so evidence that is spread out (both eyes, the whole blending
    boundary) moves the score even where no single region would. Raises ValueError
    like `occlusion`.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {image.shape}")
    if masks < 1 or cells < 1 or max_batch < 1 or not 0.0 < keep < 1.0:
        raise ValueError(f"bad RISE settings: masks {masks}, cells {cells}, keep {keep}")
    height, width = int(image.shape[1]), int(image.shape[2])
    image = np.ascontiguousarray(image, dtype=np.float32)
    filler = _filler(image, fill, max(1, round(min(height, width) / cells)))
    per_batch = max(1, min(max_batch, MAX_BATCH_BYTES // max(1, image.nbytes)))
    rng = np.random.default_rng(seed)
    weighted = np.zeros((height, width), dtype=np.float64)
    kept = np.zeros((height, width), dtype=np.float64)
    total = 0.0
    for start in range(0, masks, per_batch):
        m = _rise_masks(rng, min(per_batch, masks - start), height, width, cells, keep)
        batch = image[None] * m[:, None] + filler[None] * (1.0 - m[:, None])
        got = _scores(score, batch.astype(np.float32))
        # Not tensordot: BLAS threads spinning after it would take the cores from the
        # scorer's own threads (RISE ran 2x slower with it on 2 cores).
        weighted += (got[:, None, None] * m).sum(axis=0)
        kept += m.sum(axis=0, dtype=np.float64)
        total += float(got.sum())
    heat = weighted / np.maximum(kept, 1e-12) - total / masks
    heat[kept <= 1e-12] = 0.0
    peak = float(heat.max())
    if peak <= MIN_DROP:
        return np.zeros((height, width), dtype=np.float32)
    return (np.maximum(heat, 0.0) / peak).astype(np.float32)


def patch_occlusion(
    score: Scorer,
    image: npt.NDArray[np.float32],
    tile: int,
    *,
    stride: int | None = None,
    max_batch: int = MAX_BATCH,
) -> npt.NDArray[np.float32]:
    """Occlusion map of a model that scores an image as the mean of its `tile` x `tile`
    patches' scores (the whole-image patch models, `score.patches`), on one (3, H, W)
    float32 image whose H and W are multiples of `tile`.

    Hiding a region here means leaving its patch out of the mean, not painting over it:
    the patch models read any flat or smoothed region as up-sampled, so a painted
    occluder raises their score almost everywhere and shows no evidence (fingerprint on
    the dev set's frames: a grey square raised the score in 84% of windows, a blurred
    one in 94%; median Pearson with Grad-CAM 0.02 and 0.07, against 0.16 for this map,
    benchmarks/bench_heatmaps.py). Leaving a patch out of the mean of n lowers the
    score by (its score - the mean) / (n - 1), so a window's heat is that, for
    `tile`-sized windows every `stride` pixels (default half a tile); a pixel's heat is
    the mean over the windows that cover it, scaled as `occlusion` scales. `score` only
    ever sees (M, 3, tile, tile) batches, which a fixed-shape ONNX export accepts. An
    image of a single patch has no mean to leave it out of: it gets `occlusion` with its
    defaults.

    Raises ValueError for an image that is not (3, H, W) with H, W multiples of `tile`.
    """
    if image.ndim != 3 or image.shape[0] != 3 or tile < 1:
        raise ValueError(f"expected a (3, H, W) image, got shape {image.shape}")
    height, width = int(image.shape[1]), int(image.shape[2])
    if height % tile or width % tile:
        raise ValueError(f"H and W must be multiples of the patch ({tile}): {image.shape}")
    rows, cols = height // tile, width // tile
    if rows * cols == 1:
        return occlusion(score, image, max_batch=max_batch)
    step = stride if stride is not None else max(1, tile // 2)
    if step < 1 or max_batch < 1:
        raise ValueError(f"stride and max_batch must be >= 1 ({step}, {max_batch})")
    grid = [(r * tile, c * tile) for r in range(rows) for c in range(cols)]
    sliding = [(y, x) for y in _starts(height, tile, step) for x in _starts(width, tile, step)]
    windows = list(dict.fromkeys([*grid, *sliding]))
    image = np.ascontiguousarray(image, dtype=np.float32)
    scores = np.empty(len(windows), dtype=np.float64)
    for start in range(0, len(windows), max_batch):
        chunk = windows[start : start + max_batch]
        batch = np.stack([image[:, y : y + tile, x : x + tile] for y, x in chunk])
        scores[start : start + len(chunk)] = _scores(score, batch)
    mean = float(scores[: len(grid)].mean())
    drops = (scores - mean) / (len(grid) - 1)

    return _window_heat((height, width), windows, (tile, tile), drops)


def colormap(heat: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Blue -> red ramp through green and yellow, readable in print and on screen.

    Public because the report draws its colour scale with it: the scale beside a
    heatmap must be the very ramp the heatmap was painted with."""
    h = np.clip(heat, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * h - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * h - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * h - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def overlay(
    image: npt.NDArray[np.uint8], heat: npt.NDArray[np.float32], *, alpha: float = 0.45
) -> npt.NDArray[np.uint8]:
    """The heatmap blended over the image it explains (resized to the image)."""
    if heat.shape != image.shape[:2]:
        heat = np.asarray(
            Image.fromarray(heat.astype(np.float32), mode="F").resize(
                (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
    colour = colormap(heat).astype(np.float32)
    a = alpha * np.clip(heat, 0.0, 1.0)[..., None] + 0.15
    blended = image.astype(np.float32) * (1.0 - a) + colour * a
    out: npt.NDArray[np.uint8] = np.clip(blended, 0, 255).astype(np.uint8)
    return out


def png(image: npt.NDArray[np.uint8]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", optimize=False)
    return out.getvalue()
