"""PDQ hashes in the verdict: what a fact-checker matching re-uploads relies on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthwatch.operators import phash
from synthwatch.pipeline.scan import scan_all
from synthwatch.schemas import Verdict, decode, encode
from tests.api_harness import api_settings
from tests.media_factory import make_video

skdata = pytest.importorskip("skimage.data")


def _reencoded(image: np.ndarray, *, quality: int = 70, scale: float = 1.0, crop: float = 0.0):
    pil = Image.fromarray(image)
    if crop:
        w, h = pil.size
        dx, dy = int(w * crop), int(h * crop)
        pil = pil.crop((dx, dy, w - dx, h - dy))
    if scale != 1.0:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_a_re_encoded_resized_cropped_copy_stays_within_the_match_distance() -> None:
    original = skdata.astronaut()
    digest, quality = phash.pdq(original)
    assert len(digest) == 64 and quality >= phash.MIN_QUALITY
    for copy in (
        _reencoded(original, quality=60),
        _reencoded(original, scale=0.5),
        _reencoded(original, crop=0.01),
        _reencoded(original, quality=75, scale=0.7, crop=0.01),
    ):
        assert phash.distance(digest, phash.pdq(copy)[0]) <= phash.MATCH_DISTANCE
    # PDQ is not made for crops: 2% off each side already moves it past the threshold.
    assert phash.distance(digest, phash.pdq(_reencoded(original, crop=0.02))[0]) > 31
    # Other photographs are far away: about half the bits differ.
    for other in (skdata.coffee(), skdata.chelsea(), skdata.rocket()):
        assert phash.distance(digest, phash.pdq(other)[0]) > 3 * phash.MATCH_DISTANCE


def test_the_hex_form_is_the_bit_vector_most_significant_first() -> None:
    import pdqhash

    image = skdata.coffee()
    bits, _ = pdqhash.compute(image)
    digest, _ = phash.pdq(image)
    assert int(digest, 16) == int("".join(str(int(b)) for b in bits), 2)
    flipped = format(int(digest, 16) ^ (1 << 255) ^ 1, "064x")
    assert phash.distance(digest, flipped) == 2


def test_a_flat_image_is_hashed_with_a_quality_that_says_not_to_match_on_it() -> None:
    _, quality = phash.pdq(np.full((200, 300, 3), 128, np.uint8))
    assert quality < phash.MIN_QUALITY


def test_every_scanned_still_and_sampled_frame_is_hashed_in_the_verdict(tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, width=320, height=240)
    settings = api_settings(tmp_path)
    results = scan_all(settings, [str(photo), str(clip)], workers=1)
    still, video = (r.verdict for r in results)
    assert [h.time_s for h in still.hashes] == [None]
    assert still.hashes[0].hash == phash.pdq(skdata.astronaut())[0]
    sampled = [h for h in video.hashes if h.algorithm == "pdq"]
    assert len(sampled) == len(video.frames) >= 2
    assert [h.time_s for h in sampled] == sorted(h.time_s for h in sampled)
    # and the video's vPDQ, a frame a second
    assert [h.time_s for h in video.hashes if h.algorithm == "vpdq"] == [0.0, 1.0]
    # The hashes travel with the verdict record.
    assert decode(encode(video), Verdict).hashes == video.hashes
    assert results[1].record["hashes"][0]["algorithm"] == "pdq"
