"""Forensic maps: up-sampling peaks, error level of a splice, PNG rendering."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from skimage import data

from synthwatch.operators.signals.forensic import ForensicMap, error_level, residual_spectrum

Rgb = npt.NDArray[np.uint8]
NATURAL = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _natural(name: str) -> Rgb:
    image: Rgb = getattr(data, name)()
    h, w = image.shape[:2]
    return image[: h // 2 * 2, : w // 2 * 2]


def _upsampled_from_half(image: Rgb, resample: Image.Resampling) -> Rgb:
    h, w = image.shape[:2]
    half = Image.fromarray(image).resize((w // 2, h // 2), Image.Resampling.BOX)
    return np.asarray(half.resize((w, h), resample))


def _jpeg(image: Rgb, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decoded(jpeg: bytes) -> Rgb:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


# --- residual spectrum ------------------------------------------------------------------


@pytest.mark.parametrize("name", NATURAL)
@pytest.mark.parametrize("resample", [Image.Resampling.NEAREST, Image.Resampling.BILINEAR])
def test_2x_upsampled_image_scores_well_above_the_natural_one(
    name: str, resample: Image.Resampling
) -> None:
    natural = _natural(name)
    upsampled = _upsampled_from_half(natural, resample)
    natural_score = residual_spectrum(natural).score
    upsampled_score = residual_spectrum(upsampled).score
    assert natural_score < 2.0
    assert upsampled_score > 3.0 * max(natural_score, 1.0)


@pytest.mark.parametrize("name", NATURAL)
def test_jpeg_block_grid_alone_does_not_look_upsampled(name: str) -> None:
    # An 8x8 JPEG grid also puts energy at N/2; the N/8 normalisation must absorb it.
    natural = _natural(name)
    compressed = residual_spectrum(_decoded(_jpeg(natural, 75))).score
    upsampled = residual_spectrum(_upsampled_from_half(natural, Image.Resampling.BILINEAR)).score
    assert compressed < 2.5 < upsampled


def test_eightfold_upsampling_puts_the_residual_power_on_the_eighth_lattice() -> None:
    # A latent-diffusion decoder enlarges by 8; a natural image has no such lattice.
    natural, upsampled = [], []
    for name in NATURAL:
        image = _natural(name)
        h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
        image = image[:h, :w]
        small = Image.fromarray(image).resize((w // 8, h // 8), Image.Resampling.BOX)
        enlarged = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
        natural.append(residual_spectrum(image).features["grid_energy"])
        upsampled.append(residual_spectrum(enlarged).features["grid_energy"])
    assert np.mean(upsampled) > np.mean(natural) + 1.5
    assert sum(u > n for u, n in zip(upsampled, natural, strict=True)) >= 5


def test_spectrum_shows_bright_dots_at_the_edge_midpoints_only_when_upsampled() -> None:
    natural = _natural("chelsea")
    for image, expect_dots in (
        (natural, False),
        (_upsampled_from_half(natural, Image.Resampling.NEAREST), True),
    ):
        spec = residual_spectrum(image).image
        h, w = spec.shape
        # fftshift puts frequency -N/2 in row/column 0; the 3x3 max allows for odd sizes.
        dots = [spec[h // 2 - 1 : h // 2 + 2, :2].max(), spec[:2, w // 2 - 1 : w // 2 + 2].max()]
        top = np.percentile(spec, 99.5)
        assert all(d >= top for d in dots) is expect_dots


def test_spectrum_uses_a_native_resolution_centre_crop_of_large_images() -> None:
    big = np.tile(_natural("astronaut"), (3, 3, 1))  # 1536 x 1536
    result = residual_spectrum(big)
    assert result.features["crop_height"] == result.features["crop_width"] == 1024
    assert result.image.shape == (1023, 1023)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 200, 3), dtype=np.uint8),
        np.zeros((128, 128, 3), dtype=np.float32),
        np.zeros((128, 128, 4), dtype=np.uint8),
    ],
)
def test_spectrum_rejects_images_it_cannot_measure(bad: npt.NDArray[np.generic]) -> None:
    with pytest.raises(ValueError):
        residual_spectrum(bad)  # type: ignore[arg-type]


# --- error level analysis ---------------------------------------------------------------

SPLICE = (64, 64, 128)  # top, left, side: on the 8x8 grid


def _spliced_pair(name: str, donor_name: str) -> tuple[bytes, bytes]:
    """(untouched, spliced): a q70 JPEG re-saved at q95, and the same with a 128 px
    region pasted from the centre of a q98 JPEG of another image before the re-save."""
    base = _decoded(_jpeg(_natural(name), 70))
    donor = _decoded(_jpeg(_natural(donor_name), 98))
    top, left, side = SPLICE
    cy, cx = donor.shape[0] // 2, donor.shape[1] // 2
    spliced = base.copy()
    spliced[top : top + side, left : left + side] = donor[
        cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2
    ]
    return _jpeg(base, 95), _jpeg(spliced, 95)


@pytest.mark.parametrize(
    ("name", "donor"),
    [
        ("astronaut", "chelsea"),
        ("chelsea", "coffee"),
        ("coffee", "immunohistochemistry"),
        ("immunohistochemistry", "astronaut"),
    ],
)
def test_pasted_high_quality_region_raises_the_ela_score_and_glows(name: str, donor: str) -> None:
    untouched, spliced = _spliced_pair(name, donor)
    clean, forged = error_level(untouched), error_level(spliced)
    assert forged.score > 1.5 * clean.score

    brightness = forged.image.astype(np.float64).mean(axis=2)
    top, left, side = SPLICE
    inside = brightness[top : top + side, left : left + side].mean()
    outside = np.ones(brightness.shape, dtype=bool)
    outside[top - 8 : top + side + 8, left - 8 : left + side + 8] = False
    assert inside > 2.0 * brightness[outside].mean()


def test_ela_reads_a_path_like_bytes(tmp_path: Path) -> None:
    untouched, _ = _spliced_pair("astronaut", "chelsea")
    path = tmp_path / "photo.jpg"
    path.write_bytes(untouched)
    from_path, from_bytes = error_level(path), error_level(untouched)
    assert from_path.score == from_bytes.score
    assert np.array_equal(from_path.image, from_bytes.image)
    assert from_path.image.shape == (512, 512, 3)


def test_ela_refuses_non_jpeg_and_broken_jpeg(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.fromarray(_natural("astronaut")).save(png, "PNG")
    with pytest.raises(ValueError, match="JPEG"):
        error_level(png.getvalue())
    with pytest.raises(ValueError):
        error_level(_jpeg(_natural("astronaut"), 90)[:3000])
    with pytest.raises(ValueError):
        error_level(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(ValueError):
        error_level(_jpeg(_natural("astronaut"), 90), quality=0)


# --- rendering --------------------------------------------------------------------------


def test_maps_render_to_png_of_their_own_size() -> None:
    natural = _natural("coffee")
    maps: list[ForensicMap] = [error_level(_jpeg(natural, 85)), residual_spectrum(natural)]
    for fmap in maps:
        with Image.open(io.BytesIO(fmap.png())) as rendered:
            assert rendered.format == "PNG"
            assert (rendered.height, rendered.width) == fmap.image.shape[:2]
            assert np.array_equal(np.asarray(rendered), fmap.image)


def test_map_image_is_read_only() -> None:
    fmap = residual_spectrum(_natural("chelsea"))
    with pytest.raises(ValueError):
        fmap.image[0, 0] = 1
