"""Self-blended images: pseudo-fake faces made from one real face, for `SbiFaceNet`.

Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR 2022: a face
swap pastes a generated face into a frame through a soft mask, and what generalises
across swap methods is not the generator's look but the traces of that paste: a
boundary where colour, sharpness and geometry change, and a colour mismatch between
inside and outside. Blending a face with a slightly altered copy of itself produces
exactly those traces and nothing else (same identity, same background, same lighting),
so a classifier trained on real vs self-blended crops must learn the paste traces. The
recipe below follows the paper and its code (github.com/mapooon/SelfBlendedImages):
colour and sharpness jitter on the source copy, a small affine jitter of source and
mask together, a mask from the face landmarks deformed, blurred twice with the
"keep only the fully inside part" step in between, and a blend ratio drawn from
{0.25, 0.5, 0.75, 1, 1, 1}. The paper builds the mask from the convex hull of 81
landmarks; MTCNN gives five, so the mask is an ellipse fitted to them (or to the face
box when a detector gives no landmarks) with a random smooth deformation of its outline.

Whole-picture augmentations (framing, colour, blur, noise, then flip, resolution, JPEG)
are drawn once per real/fake pair and applied to both, as the paper's code does
(albumentations `additional_targets`): the two classes then have the same distribution
of compression, resolution and colour, so the model cannot separate them by any of them.

Everything is numpy, Pillow and scipy, and draws only from the numpy Generator it is
given, so a seed fixes every pixel.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from scipy import ndimage

from synthwatch.models.nets import SBI_INPUT_SIZE

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

CROP_WORK_SIZE = 256
"""Side at which face crops are kept and blended. Blending above the net's 128 and then
shrinking with the same antialiased resize as `crop_faces` shows the net the blend
traces the way the scanner's own resize will show a real swap's."""

BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
"""The SBI code's blend ratios: a full paste half the time, partial ones otherwise."""


@dataclass(frozen=True, slots=True)
class Face:
    """A square real face crop and where the face is inside it (crop pixel coordinates).

    `landmarks` are MTCNN's five points (left eye, right eye, nose, left and right mouth
    corner) as (x, y) rows, or None for detectors without landmarks.
    """

    image: U8
    box: tuple[float, float, float, float]
    landmarks: npt.NDArray[np.float64] | None = None


@dataclass(frozen=True, slots=True)
class Blend:
    """One self-blended image: `fake` equals `real` wherever `mask` is 0."""

    real: U8
    fake: U8
    mask: F32
    """(H, W) weight of the altered copy in `fake`, in [0, 1]."""


# --------------------------------------------------------------------------- mask


def _ellipse(face: Face, rng: np.random.Generator) -> tuple[float, float, float, float, float]:
    """(centre x, centre y, semi-axis across, semi-axis along the face, angle) of the
    region a swap replaces: eyebrows to chin, cheek to cheek."""
    if face.landmarks is not None:
        pts = np.asarray(face.landmarks, dtype=np.float64)
        eyes = (pts[0] + pts[1]) / 2
        mouth = (pts[3] + pts[4]) / 2
        across = pts[1] - pts[0]
        down = mouth - eyes
        eye_mouth = max(float(np.hypot(*down)), 1.0)
        ocular = max(float(np.hypot(*across)), 1.0)
        # The face runs about 0.6 eye-mouth distances above the eyes (brows) and 0.9
        # below the mouth (chin), and is about two inter-ocular distances wide.
        centre = (eyes + mouth) / 2 + 0.15 * down
        angle = math.atan2(float(across[1]), float(across[0]))
        rx = ocular * rng.uniform(0.85, 1.15)
        ry = 1.25 * eye_mouth * rng.uniform(0.85, 1.1)
        return float(centre[0]), float(centre[1]), rx, ry, angle
    x0, y0, x1, y1 = face.box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 0.05 * h
    return cx, cy, 0.42 * w * rng.uniform(0.85, 1.1), 0.5 * h * rng.uniform(0.85, 1.1), 0.0


def face_mask(face: Face, rng: np.random.Generator) -> npt.NDArray[np.bool_]:
    """A randomly deformed, eroded or dilated binary face region, (H, W) bool."""
    height, width = face.image.shape[:2]
    cx, cy, rx, ry, angle = _ellipse(face, rng)
    # A smooth random outline: the ellipse radius modulated by a few low harmonics, so
    # the mask's edge is not the same curve on every face (the paper gets this from its
    # 81 landmarks and an elastic warp).
    theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    radius = np.ones_like(theta)
    for harmonic in (2, 3, 4):
        radius += rng.uniform(0.0, 0.06) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    ex, ey = rx * radius * np.cos(theta), ry * radius * np.sin(theta)
    cos, sin = math.cos(angle), math.sin(angle)
    xs, ys = cx + ex * cos - ey * sin, cy + ex * sin + ey * cos
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=1)
    mask = np.asarray(canvas, dtype=bool)
    reach = max(1, round(0.03 * min(rx, ry) * 2))
    steps = int(rng.integers(-reach, reach + 1))
    if steps > 0:
        mask = ndimage.binary_dilation(mask, iterations=steps)
    elif steps < 0:
        eroded = ndimage.binary_erosion(mask, iterations=-steps)
        mask = eroded if eroded.any() else mask
    return np.asarray(mask, dtype=bool)


def soften(mask: npt.NDArray[np.bool_], rng: np.random.Generator) -> F32:
    """The SBI blend mask: blur, keep only what stayed fully inside, blur again.

    The first blur and cut shrink the region by a random margin with a rounded outline;
    the second gives the soft edge a swap's feathering has. Sigmas scale with the crop.
    """
    scale = mask.shape[0] / CROP_WORK_SIZE
    soft = ndimage.gaussian_filter(mask.astype(np.float32), rng.uniform(1.0, 5.0) * scale)
    peak = float(soft.max())
    if peak <= 0.0:
        return np.zeros(mask.shape, dtype=np.float32)
    inside = (soft / peak >= 0.999).astype(np.float32)
    if not inside.any():
        inside = mask.astype(np.float32)
    soft = ndimage.gaussian_filter(inside, rng.uniform(1.0, 6.0) * scale)
    soft /= max(float(soft.max()), 1e-6)
    soft[soft < 1e-3] = 0.0  # a blur never reaches exactly zero; far pixels stay real
    return np.asarray(soft, dtype=np.float32)


# --------------------------------------------------------------------------- source copy


_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _colour_jitter(image: F32, rng: np.random.Generator) -> F32:
    """RGB shift or hue/saturation/value shift, then brightness/contrast: the colour
    mismatch of a swap.

    Hue, saturation and value are changed in YIQ space (hue: a rotation of the I-Q
    chroma plane, up to about 11 degrees; saturation: its scale; value: the scale of
    all three), which is one 3x3 matrix per image and 15x faster than an HSV round trip
    at this size.
    """
    if rng.random() < 0.5:
        image = image + rng.uniform(-20.0, 20.0, size=3).astype(np.float32)
    else:
        angle = rng.uniform(-0.03, 0.03) * 2 * np.pi
        saturation, value = rng.uniform(0.8, 1.2), rng.uniform(0.9, 1.1)
        cos, sin = math.cos(angle), math.sin(angle)
        chroma = saturation * np.array([[cos, -sin], [sin, cos]])
        yiq = np.eye(3)
        yiq[1:, 1:] = chroma
        matrix = _YIQ_TO_RGB @ (value * yiq) @ _RGB_TO_YIQ
        image = (image @ matrix.T.astype(np.float32)).astype(np.float32)
    mean = float(image.mean())
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * 255.0
    return ((image - mean) * contrast + mean + brightness).astype(np.float32)


def _sharpness_jitter(image: F32, rng: np.random.Generator) -> F32:
    """Down-and-up scaling (a blurrier paste) or unsharp masking (a crisper one)."""
    if rng.random() < 0.5:
        h, w = image.shape[:2]
        factor = int(rng.choice([2, 4]))
        u8 = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
        small = u8.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    blurred = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0.0))
    return np.asarray(image + rng.uniform(0.3, 1.0) * (image - blurred), dtype=np.float32)


def _affine(
    image: F32, mask: F32, centre: tuple[float, float], rng: np.random.Generator
) -> tuple[F32, F32]:
    """Scale by 0.95-1.05 about the face centre and shift by up to 3% of the crop, source
    and mask together (the paper's `randaffine`): the paste's slight misregistration.
    What moves in from beyond the crop is 0, and the mask is 0 there too."""
    h, w = mask.shape
    scale = rng.uniform(0.95, 1.05)
    shift_y, shift_x = rng.uniform(-0.03, 0.03, size=2) * np.array([h, w])
    cx, cy = centre
    # Pillow maps each output pixel to an input one: in = (out - c - shift) / s + c.
    data = (
        1 / scale,
        0.0,
        cx - (cx + shift_x) / scale,
        0.0,
        1 / scale,
        cy - (cy + shift_y) / scale,
    )
    rgb = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    moved = rgb.transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    moved_mask = Image.fromarray(mask.astype(np.float32)).transform(
        (w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR
    )
    return np.asarray(moved, dtype=np.float32), np.asarray(moved_mask, dtype=np.float32)


def self_blend(face: Face, rng: np.random.Generator) -> Blend:
    """Blend `face` with a colour-, sharpness- and geometry-jittered copy of itself.

    Returns the untouched real crop, the pseudo-fake and the blend mask; the two images
    differ only where the mask is above zero.
    Raises ValueError for an image that is not uint8 (H, W, 3).
    """
    real = face.image
    if real.dtype != np.uint8 or real.ndim != 3 or real.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) face crop, got {real.dtype} {real.shape}")
    target = real.astype(np.float32)
    source = _sharpness_jitter(_colour_jitter(target, rng), rng)
    region = face_mask(face, rng).astype(np.float32)
    x0, y0, x1, y1 = face.box
    source, region = _affine(source, region, ((x0 + x1) / 2, (y0 + y1) / 2), rng)
    mask = soften(region > 0.5, rng) * np.float32(rng.choice(BLEND_RATIOS))
    weight = mask[..., None]
    blended = np.clip(source * weight + target * (1.0 - weight), 0, 255).round()
    fake = np.where(weight > 0, blended, target).astype(np.uint8)
    return Blend(real=real, fake=fake, mask=mask.astype(np.float32))


# --------------------------------------------------------------------------- quality


def jpeg_roundtrip(image: U8, quality: int, *, subsampling: int = 2) -> U8:
    """Encode as JPEG and decode again (libjpeg through Pillow: deterministic).

    `subsampling` is Pillow's: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()


def degrade_alike(
    images: Sequence[U8], rng: np.random.Generator, *, size: int = SBI_INPUT_SIZE
) -> list[U8]:
    """One draw of flip, face resolution and JPEG, applied to every image in `images`,
    each then resized to `size` x `size` as `crop_faces` resizes.

    Resolution: half the time the crop is first shrunk to a side of 64-256 pixels, the
    range of face sizes the scanner crops from 360p-1080p frames, and compressed there,
    as a video frame is compressed before the scanner cuts the face out.
    """
    flip = rng.random() < 0.5
    side = int(rng.integers(64, CROP_WORK_SIZE + 1)) if rng.random() < 0.5 else None
    quality = int(rng.integers(40, 96)) if rng.random() < 0.5 else None
    subsampling = int(rng.choice([0, 2]))
    out: list[U8] = []
    for image in images:
        pil = Image.fromarray(image[:, ::-1] if flip else image)
        if side is not None and side != pil.width:
            pil = pil.resize((side, side), Image.Resampling.BILINEAR)
        if quality is not None:
            pil = Image.fromarray(jpeg_roundtrip(np.asarray(pil), quality, subsampling=subsampling))
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(pil, dtype=np.uint8).copy())
    return out


def _appearance(image: U8, rng: np.random.Generator) -> U8:
    """Framing, colour, blur and noise jitter of one image (see `vary_alike`)."""
    pil = Image.fromarray(image)
    if rng.random() < 0.5:
        # A tighter or shifted framing without borders: crop 85-100% and scale back.
        side = pil.width * rng.uniform(0.85, 1.0)
        x0, y0 = rng.uniform(0, pil.width - side), rng.uniform(0, pil.height - side)
        box = (x0, y0, x0 + side, y0 + side)
        pil = pil.resize(pil.size, Image.Resampling.BILINEAR, box=box)
    out = np.asarray(pil, dtype=np.float32)
    if rng.random() < 0.5:
        out = _colour_jitter(out, rng)
    if rng.random() < 0.15:
        out = ndimage.gaussian_filter(out, sigma=(rng.uniform(0.5, 1.5),) * 2 + (0.0,))
    if rng.random() < 0.15:
        out = (out + rng.normal(0.0, rng.uniform(2.0, 6.0), size=out.shape)).astype(np.float32)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def vary_alike(images: Sequence[U8], rng: np.random.Generator) -> list[U8]:
    """One draw of framing (crop 85-100%), colour (the same jitter the source copy gets),
    blur and sensor noise, applied to every image in `images`.

    Why: with a few hundred crops of a dozen people, a net can score a face "real" by
    recognising the exact crops it was trained on and "fake" for anything else, which
    calls every unseen real face fake. Varying the whole picture, real and fake alike,
    means no crop is ever seen twice, so only the blend traces separate the classes.
    The SBI code does the same with albumentations transforms shared by the pair.
    """
    seed = int(rng.integers(0, 2**63 - 1))
    return [_appearance(image, np.random.default_rng(seed)) for image in images]


def sbi_pair(
    face: Face, rng: np.random.Generator, *, size: int = SBI_INPUT_SIZE, vary: bool = True
) -> tuple[U8, U8]:
    """(real, self-blended fake) of one face, varied (`vary_alike`, unless `vary` is
    False) and degraded (`degrade_alike`) alike, each `size` x `size` RGB."""
    blend = self_blend(face, rng)
    pair = [blend.real, blend.fake]
    if vary:
        pair = vary_alike(pair, rng)
    real, fake = degrade_alike(pair, rng, size=size)
    return real, fake
