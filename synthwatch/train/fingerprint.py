"""Pseudo-fakes for whole images: real patches re-rendered through a simulated generator's
last up-sampling layers, for `FingerprintNet`.

Generators (GANs, the VAE decoders of latent diffusion) produce full resolution by
repeated 2x up-sampling: nearest or bilinear interpolation followed by convolutions, or
transposed convolutions. Every such step leaves a periodic trace in the pixel
correlations and peaks in the spectrum at multiples of 1/2 (and 1/4) cycles per pixel.
Zhang, Karaman & Chang ("Detecting and Simulating Artifacts in GAN Fake Images",
WIFS 2019, AutoGAN) showed that a detector trained on real images against real images
passed through a generator-like up-sampler learns these traces and transfers to
unseen GANs; the transposed convolution's uneven kernel overlap (the "checkerboard" of
Odena et al., Distill 2016) is the strongest of them. Here the simulated generator is:
downsample by 2 or 4, up-sample back by nearest, bilinear, bicubic, or a random
stride-2 transposed convolution, then optionally a light random 3x3 convolution
standing for a generator's output layer (the latent-diffusion VAE ends with
nearest-neighbour up-sampling and a 3x3 conv).

Only the re-rendering differs between a pair's real and fake patch; JPEG re-compression
is drawn once per pair and applied to both, so the net cannot separate the classes by
compression. Draws come only from the numpy Generator given, so a seed fixes every pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

from synthwatch.models.nets import FINGERPRINT_PATCH
from synthwatch.train.sbi import jpeg_roundtrip

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

UPSAMPLERS = ("nearest", "bilinear", "bicubic", "transposed")
"""How the simulated generator returns to full resolution, drawn uniformly."""

MARGIN = 8
"""Extra pixels rendered around a patch: the fake is re-rendered on a region larger
than the patch and cut with a random offset of 0-7 pixels, so the patch is not always
aligned with the up-sampling grid (a generated image may have been cropped), and so the
re-rendering's own border effects stay outside the patch."""

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _downsample(region: F32, factor: int, rng: np.random.Generator) -> F32:
    """Shrink by `factor` with an antialiased filter (box, bilinear or bicubic)."""
    h, w = region.shape[:2]
    method = rng.choice(["box", "bilinear", "bicubic"])
    resample = {
        "box": Image.Resampling.BOX,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[str(method)]
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(region[..., c])).resize(
                (w // factor, h // factor), resample
            )
        )
        for c in range(3)
    ]
    return np.stack(channels, axis=2).astype(np.float32)


def _transposed_conv(small: F32, rng: np.random.Generator) -> F32:
    """A stride-2 transposed convolution with a random 3x3 or 4x4 kernel, mixing colours.

    The kernel is the bilinear one plus noise, renormalised to keep the mean level; its
    four stride phases then sum to slightly different gains, the checkerboard a trained
    transposed convolution leaves. A little cross-channel mixing stands for the layer's
    many input channels.
    """
    h, w = small.shape[:2]
    size = int(rng.choice([3, 4]))
    base = np.array([0.5, 1.0, 0.5]) if size == 3 else np.array([0.25, 0.75, 0.75, 0.25])
    spread = rng.uniform(0.05, 0.3)
    zeros = np.zeros((2 * h, 2 * w, 3), dtype=np.float32)
    zeros[::2, ::2] = small
    out = np.zeros_like(zeros)
    mixing = np.eye(3) + rng.normal(0.0, 0.05, size=(3, 3))
    mixing /= mixing.sum(axis=1, keepdims=True)
    for c in range(3):
        kernel = np.outer(base, base) * (1.0 + rng.normal(0.0, spread, size=(size, size)))
        kernel *= 4.0 / kernel.sum()  # four output pixels per input pixel
        upsampled = ndimage.correlate(zeros, kernel[..., None], mode="reflect")
        out[..., c] = upsampled @ mixing[c]
    return out


def _upsample(small: F32, factor: int, method: str, rng: np.random.Generator) -> F32:
    if method == "transposed":
        out = small
        for _ in range(factor.bit_length() - 1):  # factor 2 -> once, 4 -> twice
            out = _transposed_conv(out, rng)
        return out
    h, w = small.shape[:2]
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(small[..., c])).resize(
                (w * factor, h * factor), _PIL_FILTERS[method]
            )
        )
        for c in range(3)
    ]
    return np.stack(channels, axis=2).astype(np.float32)


def _last_layer(image: F32, rng: np.random.Generator) -> F32:
    """A random 3x3 conv near the identity (sum 1 per output channel): a generator's
    output layer, which smooths or sharpens its up-sampler's output a little."""
    out = np.empty_like(image)
    strength = rng.uniform(0.02, 0.15)
    for c in range(3):
        kernel = np.zeros((3, 3))
        kernel[1, 1] = 1.0
        kernel += rng.normal(0.0, strength, size=(3, 3))
        kernel /= kernel.sum()
        out[..., c] = ndimage.correlate(image[..., c], kernel, mode="reflect")
    return out


def simulate_generator(
    region: U8, rng: np.random.Generator, *, factor: int | None = None, method: str | None = None
) -> U8:
    """`region` re-rendered as a generator's up-sampling path would render it.

    `factor` (2 or 4) and `method` (one of `UPSAMPLERS`) are drawn when not given. The
    output has the input's shape; sides must be multiples of `factor`.
    Raises ValueError for a bad image, factor or method.
    """
    if region.dtype != np.uint8 or region.ndim != 3 or region.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {region.dtype} {region.shape}")
    factor = factor if factor is not None else int(rng.choice([2, 2, 2, 4]))
    method = method if method is not None else str(rng.choice(UPSAMPLERS))
    if factor not in (2, 4):
        raise ValueError(f"factor must be 2 or 4, got {factor}")
    if method not in UPSAMPLERS:
        raise ValueError(f"unknown up-sampler {method!r}")
    h, w = region.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"sides {h}x{w} are not multiples of {factor}")
    small = _downsample(region.astype(np.float32), factor, rng)
    fake = _upsample(small, factor, method, rng)
    if rng.random() < 0.5:
        fake = _last_layer(fake, rng)
    return np.clip(fake, 0, 255).round().astype(np.uint8)


def compress_alike(images: Sequence[U8], rng: np.random.Generator) -> list[U8]:
    """One JPEG draw (none half the time, else quality 60-100, 4:2:0 or 4:4:4) applied to
    every image in `images`: real and fake of a pair share their compression."""
    if rng.random() < 0.5:
        return [image.copy() for image in images]
    quality = int(rng.integers(60, 101))
    subsampling = int(rng.choice([0, 2]))
    return [jpeg_roundtrip(image, quality, subsampling=subsampling) for image in images]


def _palette(image: U8) -> U8:
    """256-colour palette with Floyd-Steinberg dithering, as a GIF or PNG-8 stores it."""
    quantised = Image.fromarray(image).quantize(
        256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
    )
    return np.asarray(quantised.convert("RGB"), dtype=np.uint8).copy()


def fingerprint_pair(
    image: U8,
    rng: np.random.Generator,
    *,
    patch: int = FINGERPRINT_PATCH,
    vary: bool = True,
) -> tuple[U8, U8]:
    """(real patch, pseudo-fake patch), both `patch` x `patch`, from one real image at its
    native resolution: the same place of the image, rendered as captured and as a
    simulated generator would render it, then flipped and JPEG-compressed alike.

    With `vary` (the default), three more draws keep cues other than the up-sampling
    trace from separating the classes: the real region is blurred half the time
    (the simulated generator loses fine detail, and a soft photograph is not evidence
    of generation); a quarter of pairs are shrunk alike by 0.5-0.9 with an antialiased
    filter (a platform resized the picture: the trace survives, aliased, in the fake
    and nothing appears in the real); and a tenth are stored alike as a dithered
    256-colour palette (GIF, PNG-8), whose dithering noise is neither class's.
    Raises ValueError for an image smaller than `patch` + `MARGIN` on either side.
    """
    h, w = image.shape[:2]
    need = patch + MARGIN
    if h < need or w < need:
        raise ValueError(f"image {h}x{w} smaller than {need} pixels")
    shrink = 1.0
    if vary and rng.random() < 0.25:
        shrink = float(rng.uniform(0.5, 0.9))
    side = -(-math.ceil(need / shrink) // 4) * 4  # a multiple of 4 for the x4 up-sampler
    if side > min(h, w):
        side, shrink = need, 1.0
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    region = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
    fake_region = simulate_generator(region, rng)
    if vary and rng.random() < 0.5:
        sigma = rng.uniform(0.4, 1.2)
        blurred = ndimage.gaussian_filter(region.astype(np.float32), (sigma, sigma, 0.0))
        region = np.clip(blurred, 0, 255).round().astype(np.uint8)
    if shrink != 1.0:
        small = max(need, round(side * shrink))
        region, fake_region = (
            np.asarray(Image.fromarray(r).resize((small, small), Image.Resampling.BILINEAR))
            for r in (region, fake_region)
        )
    dy, dx = (int(v) for v in rng.integers(0, MARGIN, size=2))
    real = region[dy : dy + patch, dx : dx + patch]
    fake = fake_region[dy : dy + patch, dx : dx + patch]
    if rng.random() < 0.5:
        real, fake = real[:, ::-1], fake[:, ::-1]
    pair = [np.ascontiguousarray(real), np.ascontiguousarray(fake)]
    if vary and rng.random() < 0.1:
        pair = [_palette(p) for p in pair]
    real_out, fake_out = compress_alike(pair, rng)
    return real_out, fake_out


def patch_grid(image: U8, *, patch: int = FINGERPRINT_PATCH, limit: int = 64) -> list[U8]:
    """Non-overlapping `patch` x `patch` tiles of `image` at native resolution, at most
    `limit` of them spread evenly over the grid: what the scanner scores per image.

    Tiles start at multiples of `patch` (a multiple of 8, so of the JPEG block grid).
    An image smaller than one tile gives no tiles.
    """
    h, w = image.shape[:2]
    rows, cols = h // patch, w // patch
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    if len(cells) > limit:
        picks = np.linspace(0, len(cells) - 1, limit).round().astype(int)
        cells = [cells[i] for i in picks]
    return [
        np.ascontiguousarray(image[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch])
        for r, c in cells
    ]
