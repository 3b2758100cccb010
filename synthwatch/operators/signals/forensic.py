"""Forensic maps of a still image: error level analysis and the up-sampling spectrum.

Both are classic, model-free traces. Each comes back as a `ForensicMap`: an image an
analyst can look at in the evidence bundle (`png()`), one scalar `score` for calibration
and fusion, and the handful of numbers the score was built from. Neither is a verdict:
recompression, resizing and filters leave the same traces, which is why they are
features and not decisions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

MAX_ELA_PIXELS = 40_000_000
"""Larger JPEGs are refused: ELA decodes and re-encodes the whole image twice."""
ELA_MAX_GAIN = 20.0
"""Cap on the display amplification, so a near-lossless file's ±1 rounding noise is not
stretched to full white and mistaken for a bright region."""
ELA_SMOOTH_BLOCKS = 5
ELA_DENOMINATOR_FLOOR = 0.5
"""Added to the median block error (grey levels) so a file re-saved at its own quality,
whose median error is ~0, does not turn every textured block into an infinite score."""

SPECTRUM_MAX_CROP = 1024
"""Side of the centre crop the spectrum is computed on, at native resolution."""
SPECTRUM_MIN_SIDE = 64
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights JPEG's YCbCr uses


@dataclass(frozen=True, eq=False)
class ForensicMap:
    """A forensic map for display, its scalar score and the features behind it.

    `image` is uint8, (H, W, 3) or (H, W), held as a read-only view so a consumer cannot
    alter the evidence after it was scored. eq=False because comparing arrays
    element-wise has no single truth value.
    """

    kind: str
    image: npt.NDArray[np.uint8]
    score: float
    features: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim not in (2, 3):
            raise ValueError(f"{self.kind}: image must be uint8 (H, W[, 3])")
        view = self.image.view()
        view.setflags(write=False)
        object.__setattr__(self, "image", view)

    def png(self) -> bytes:
        """The map as PNG bytes, lossless so the evidence shows exactly what was scored."""
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(self.image)).save(buf, format="PNG")
        return buf.getvalue()


def error_level(source: Path | bytes, *, quality: int = 90) -> ForensicMap:
    """Error level analysis (Krawetz, "A Picture's Worth", Black Hat 2007) of a JPEG.

    The JPEG is re-saved at `quality` with its own chroma subsampling and the absolute
    per-pixel difference is the map: a region whose compression history differs from the
    rest (pasted from another file, or retouched after the last save) settles to a
    different error level. Only JPEG input is meaningful, since the trace is the JPEG
    quantisation itself, so anything else raises.

    `score` is how non-uniform the error level is across the image: the per-8x8-block
    mean error (blocks on the JPEG grid, averaged over channels), smoothed with a 5x5
    median over blocks so that isolated textured blocks do not count and a contiguous
    region of about 40 px or more does, then (P99 - P50) / (P50 + ELA_DENOMINATOR_FLOOR).
    It separates the textbook case (a low-quality JPEG with a region pasted from a
    high-quality one, re-saved at high quality) and little else: strongly textured next
    to flat content (sky over ground) also scores high, and a splice saved at a quality
    close to the ELA quality barely shows. It is a feature to fuse, not a detector.

    Raises:
        ValueError: `source` is not a decodable JPEG, is larger than MAX_ELA_PIXELS or
            smaller than one 8x8 block, or `quality` is outside 1..100.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    original, subsampling = _decode_jpeg(source)
    buf = io.BytesIO()
    Image.fromarray(original).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    with Image.open(buf) as resaved_im:
        resaved = np.asarray(resaved_im.convert("RGB"))
    diff = np.abs(original.astype(np.int16) - resaved.astype(np.int16)).astype(np.float64)

    h8, w8 = (diff.shape[0] // 8) * 8, (diff.shape[1] // 8) * 8
    blocks = diff[:h8, :w8].mean(axis=2).reshape(h8 // 8, 8, w8 // 8, 8).mean(axis=(1, 3))
    smooth = _median(blocks, ELA_SMOOTH_BLOCKS)
    p50, p99 = (float(v) for v in np.percentile(smooth, [50, 99]))
    score = (p99 - p50) / (p50 + ELA_DENOMINATOR_FLOOR)

    top = float(np.percentile(diff, 99.5))
    gain = min(ELA_MAX_GAIN, 255.0 / max(top, 1.0))
    image = np.clip(diff * gain, 0, 255).astype(np.uint8)
    features = {
        "quality": float(quality),
        "mean_error": float(diff.mean()),
        "block_p50": p50,
        "block_p99": p99,
        "block_max": float(smooth.max()),
        "abnormal_fraction": float(np.mean(smooth > 2.0 * p50 + 1.0)),
        "display_gain": gain,
    }
    return ForensicMap(kind="error_level", image=image, score=float(score), features=features)


def _decode_jpeg(source: Path | bytes) -> tuple[npt.NDArray[np.uint8], int]:
    """RGB pixels of a JPEG and its chroma subsampling as Pillow's `subsampling` code."""
    fp: Path | io.BytesIO = source if isinstance(source, Path) else io.BytesIO(source)
    try:
        with Image.open(fp, formats=["JPEG"]) as im:
            if im.width * im.height > MAX_ELA_PIXELS:
                raise ValueError(f"{im.width}x{im.height} JPEG exceeds {MAX_ELA_PIXELS} pixels")
            if im.width < 8 or im.height < 8:
                raise ValueError(f"{im.width}x{im.height} JPEG is smaller than one 8x8 block")
            sampling = JpegImagePlugin.get_sampling(im)
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a usable JPEG: {exc}") from exc
    except OSError as exc:  # truncated or corrupt entropy-coded data
        raise ValueError(f"JPEG does not decode: {exc}") from exc
    # get_sampling is -1 for grayscale/CMYK; 2 (4:2:0) is what encoders use by default.
    return rgb, sampling if sampling >= 0 else 2


def residual_spectrum(image: npt.NDArray[np.uint8]) -> ForensicMap:
    """Spectrum of the high-pass residual and a score for periodic up-sampling peaks.

    Generators and up-scalers enlarge feature maps or images by 2 (nearest, bilinear,
    transposed convolution), which makes the local high-frequency energy periodic with
    a period of 2 pixels: every other difference is an interpolated one. Zhang et al.
    2019 ("Detecting and simulating artifacts in GAN fake images", AutoGAN) and Durall
    et al. 2020 show these as peaks in the spectrum; NPR (Tan et al., CVPR 2024) uses the
    same neighbouring-pixel relationship as its input.

    The residual is the first-difference magnitude |dx| + |dy| of the BT.601 luminance
    on a centre crop of at most SPECTRUM_MAX_CROP per side, never resized (resizing
    would re-interpolate and erase the trace). A magnitude, not the signed residual:
    for ideal interpolators the signed residual's spectrum has a *zero* at N/2 (the
    kernel's own zero), whereas the magnitude's periodicity shows as a peak there, the
    same reason Popescu & Farid (2005) and Gallagher (2005) look at residual energy.
    `image` is the log-magnitude spectrum of that residual, centred (DC in the middle),
    so the peaks are bright dots at the edge midpoints.

    `score` is the N/2 peak over the local spectral background (geometric mean of the
    horizontal and vertical peaks, ~1-3 on natural images), divided by the 8x8 grid
    peak at N/8 and 3N/8 when that exceeds 1: a JPEG block grid also puts energy at N/2
    (a harmonic of N/8) but 2x up-sampling does not put any at N/8, so the division keeps
    ordinary JPEG photos from looking up-sampled.

    Raises:
        ValueError: `image` is not uint8 (H, W, 3) or (H, W), or is smaller than
            SPECTRUM_MIN_SIDE on a side.
    """
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ValueError(f"expected uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if min(h, w) < SPECTRUM_MIN_SIDE:
        raise ValueError(f"{w}x{h} image is smaller than {SPECTRUM_MIN_SIDE} px on a side")
    ch, cw = min(h, SPECTRUM_MAX_CROP), min(w, SPECTRUM_MAX_CROP)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top : top + ch, left : left + cw].astype(np.float64)
    luma = crop @ _LUMA if crop.ndim == 3 else crop

    dx = np.abs(np.diff(luma, axis=1))[:-1, :]
    dy = np.abs(np.diff(luma, axis=0))[:, :-1]
    residual = dx + dy
    residual -= residual.mean()
    window = np.outer(np.hanning(residual.shape[0]), np.hanning(residual.shape[1]))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(residual * window)))

    half_x = _peak_ratio(spectrum, 0.0, 0.5)
    half_y = _peak_ratio(spectrum, 0.5, 0.0)
    quarter = _geomean(_peak_ratio(spectrum, 0.0, 0.25), _peak_ratio(spectrum, 0.25, 0.0))
    grid8 = _geomean(
        *(_peak_ratio(spectrum, 0.0, f) for f in (0.125, 0.375)),
        *(_peak_ratio(spectrum, f, 0.0) for f in (0.125, 0.375)),
    )
    half = _geomean(half_x, half_y)
    score = half / max(1.0, grid8)
    grid_energy = _grid_energy(luma)

    logmag = np.log1p(spectrum)
    lo, hi = np.percentile(logmag, [1.0, 99.9])
    display = np.clip((logmag - lo) / max(float(hi - lo), 1e-9) * 255.0, 0, 255).astype(np.uint8)
    features = {
        "half_x": half_x,
        "half_y": half_y,
        "half": half,
        "quarter": quarter,
        "grid8": grid8,
        "grid_energy": grid_energy,
        "diagonal": _peak_ratio(spectrum, 0.5, 0.5),
        "crop_height": float(ch),
        "crop_width": float(cw),
    }
    return ForensicMap(
        kind="residual_spectrum", image=display, score=float(score), features=features
    )


def _grid_energy(luma: npt.NDArray[np.float64]) -> float:
    """Log share of the noise residual's power that lies on the 1/8-period lattice.

    Every up-sampling by 2, 4 or 8 (GAN generators, and the factor-8 decoder of latent
    diffusion autoencoders, Rombach et al. 2022) leaves peaks at multiples of N/8 in the
    residual spectrum; Corvi et al. (ICASSP 2023, "On the detection of synthetic images
    generated by diffusion models") show such lattice peaks in the averaged residual
    spectra of latent-diffusion images. The residual here is the signed difference from a
    3x3 median, on the largest top-left crop whose sides are multiples of 8 so that the
    N*k/8 bins are exact; the power at the k/8 frequencies (k = 1..7) on both axes is
    averaged and divided by the mean power over the whole spectrum, and its log returned
    (about 0 for aperiodic noise). A JPEG 8x8 block grid also puts power on this lattice,
    so the feature is fused only through a calibration fitted on labelled JPEGs, and
    re-sampling the image (any resize) moves the lattice off these bins: the trace is
    gone, as for every up-sampling detector.
    """
    h, w = (luma.shape[0] // 8) * 8, (luma.shape[1] // 8) * 8
    crop = luma[:h, :w]
    residual = crop - _median(crop, 3)
    power = np.abs(np.fft.fft2(residual - residual.mean())) ** 2
    power /= max(float(power.mean()), 1e-12)
    lattice = [power[k * h // 8, 0] + power[0, k * w // 8] for k in range(1, 8)]
    return float(np.log(max(float(np.mean(lattice)) / 2.0, 1e-12)))


def _peak_ratio(spectrum: npt.NDArray[np.float64], fy: float, fx: float) -> float:
    """Peak at normalised frequency (fy, fx) over the median of its neighbourhood.

    The peak is the max of the 3x3 bins around the target (odd sizes have no exact N/2
    bin); the background is the 15x15 neighbourhood minus its central 5x5, wrapping
    around the spectrum's edges since the DFT is periodic.
    """
    h, w = spectrum.shape
    cy, cx = h // 2 + round(fy * h), w // 2 + round(fx * w)
    rows = np.arange(cy - 7, cy + 8) % h
    cols = np.arange(cx - 7, cx + 8) % w
    patch = spectrum[np.ix_(rows, cols)]
    core = patch[6:9, 6:9].max()
    mask = np.ones(patch.shape, dtype=bool)
    mask[5:10, 5:10] = False
    return float(core / (np.median(patch[mask]) + 1e-12))


def _geomean(*values: float) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(values, 1e-12)))))


def _median(a: npt.NDArray[np.floating], size: int) -> npt.NDArray[np.float64]:
    """`size` x `size` median filter of a 2-D float array, edges replicated.

    OpenCV's `medianBlur` (float input for sizes 3 and 5, replicated borders): the same
    values as scipy's `ndimage.median_filter` with mode "nearest" (and, for size 3, its
    default "reflect", whose one-pixel pad is the edge pixel too), computed in float32,
    whose rounding is far below the features' resolution. scipy's import alone cost
    half a second of every still's scan.
    """
    import cv2

    if size not in (3, 5):
        raise ValueError(f"median size must be 3 or 5, got {size}")
    out = cv2.medianBlur(np.ascontiguousarray(a, dtype=np.float32), size)
    return np.asarray(out, dtype=np.float64)
