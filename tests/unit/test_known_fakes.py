"""The issue's check: a list built from the dev fakes catches their re-uploads.

Each dev fake is listed with `synthwatch hashes add` (PDQ for a still, vPDQ for an
animation). Then every fake is re-uploaded the ways fakes travel, each copy re-encoded
(JPEG at quality 70; animations as H.264 MP4): at full size, at half size, with 1% cut
off each side, and mirrored. Every copy must be flagged by the `match` signal
alone, naming its entry, but for one measured miss (`KNOWN_MISSES`); the dev set's real
stills and a real clip, never listed, must match nothing; and the fake's real source
clip shows what a hash cannot tell apart.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image, ImageSequence
from typer.testing import CliRunner

from synthwatch.operators import matching
from synthwatch.operators.matching import MatchingSettings
from synthwatch.pipeline.cli import app
from synthwatch.pipeline.scan import scan_all
from tests.api_harness import api_settings

pytestmark = pytest.mark.shared

REFERENCE = "https://factcheck.example/debunked/"


TRANSFORMS = {
    "re-encoded": (0.0, 1.0),
    "half size": (0.0, 0.5),
    "cropped 1% a side": (0.01, 1.0),
}
"""(crop per side, scale) of each copy; each copy is also re-encoded (JPEG at quality 70,
or H.264 at CRF 28)."""

KNOWN_MISSES = {("liveportrait_generated_inference.gif", "cropped 1% a side")}
"""PDQ's known weakness, measured: this animation is a 384x128 strip of three 128-pixel
panels, and cutting 1% off each side moves its frames 44-46 bits (threshold 31). Kept
here so the day it matches, or anything else stops matching, this test says so."""


def _copy_frame(im: Image.Image, crop: float, scale: float) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * crop), round(h * crop)
    im = im.convert("RGB").crop((dx, dy, w - dx, h - dy))
    # Even sides, as H.264 needs.
    size = (max(2, int(im.width * scale) // 2 * 2), max(2, int(im.height * scale) // 2 * 2))
    return im.resize(size, Image.BILINEAR)


def reupload_still(src: Path, dst: Path, crop: float, scale: float) -> Path:
    _copy_frame(Image.open(src), crop, scale).save(dst, format="JPEG", quality=70)
    return dst


def reupload_animation(
    src: Path, dst: Path, crop: float, scale: float, *, mirror: bool = False
) -> Path:
    """The animation as an H.264 MP4, each frame shown for as long as it was."""
    frames = []
    with Image.open(src) as im:
        for f in ImageSequence.Iterator(im):
            image = _copy_frame(f, crop, scale)  # loads the frame: WebP's duration is known then
            if mirror:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            frames.append((image, int(f.info.get("duration") or 100)))
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=1000)
        stream.width, stream.height = frames[0][0].size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.options = {"crf": "28"}
        t = 0
        for image, duration in frames:
            frame = av.VideoFrame.from_image(image)
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            out.mux(stream.encode(frame))
            t += max(1, duration)
        out.mux(stream.encode(None))
    return dst


def test_reuploaded_dev_fakes_are_flagged_by_the_match_alone(
    shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = shared_dir / "media" / "dev"
    stills = sorted((dev / "images" / "fake").glob("*.jpg")) + sorted((dev / "fake").glob("*.jpg"))
    animations = sorted((dev / "fake").glob("*.gif")) + sorted((dev / "fake").glob("*.webp"))
    assert len(stills) >= 10 and len(animations) >= 3
    db = tmp_path / "lists.sqlite3"
    monkeypatch.setenv("SYNTHWATCH_MATCHING__DB", str(db))
    monkeypatch.setenv("SYNTHWATCH_MODEL_DIR", str(tmp_path / "no-weights"))

    runner = CliRunner()
    for fake in stills + animations:
        result = runner.invoke(
            app,
            [
                "hashes", "add", str(fake), "--list", "dev-fakes", "--id", fake.name,
                "--source", "test desk", "--reference", REFERENCE + fake.name,
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["hashes", "list", "--list", "dev-fakes", "--json"])
    assert listed.exit_code == 0, listed.output
    kinds = {e["id"]: e["algorithm"] for e in map(json.loads, listed.stdout.splitlines())}
    assert kinds == {f.name: "vpdq" if f in animations else "pdq" for f in stills + animations}

    copies: dict[Path, tuple[Path, str]] = {}
    for n, fake in enumerate(stills + animations):
        for k, (how, (crop, scale)) in enumerate(TRANSFORMS.items()):
            if fake in animations:
                copy = reupload_animation(fake, tmp_path / f"copy{n}_{k}.mp4", crop, scale)
            else:
                copy = reupload_still(fake, tmp_path / f"copy{n}_{k}.jpg", crop, scale)
            copies[copy] = (fake, how)
        # A mirrored copy: matched through PDQ's flipped hashes.
        if fake in stills:
            mirrored = tmp_path / f"copy{n}_mirrored.jpg"
            Image.open(fake).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
                mirrored, format="JPEG", quality=70
            )
        else:
            mirrored = reupload_animation(
                fake, tmp_path / f"copy{n}_mirrored.mp4", 0.0, 1.0, mirror=True
            )
        copies[mirrored] = (fake, "mirrored")
    settings = api_settings(tmp_path).model_copy(update={"matching": MatchingSettings(db=db)})
    results = scan_all(settings, [str(p) for p in copies], workers=2)
    missed = set()
    for result in results:
        original, how = copies[Path(result.source)]
        verdict = result.verdict
        assert verdict is not None, (original.name, how, result.error)
        if not verdict.matches:
            missed.add((original.name, how))
            continue
        assert verdict.decision == "flag", (original.name, how)
        assert verdict.decided_by == ["match"], (original.name, how)
        top = verdict.matches[0]
        assert (top.list, top.entry, top.label) == ("dev-fakes", original.name, "fake")
        assert top.reference == REFERENCE + original.name and top.source == "test desk"
        assert top.distance <= top.threshold
        assert top.algorithm == ("vpdq" if original in animations else "pdq")
        assert top.transform == ("mirrored" if how == "mirrored" else ""), (original.name, how)
    assert missed == KNOWN_MISSES

    # Unrelated media, never listed: the dev set's real stills and a real clip.
    real = sorted((dev / "images" / "real").glob("*.jpg")) + sorted((dev / "real").glob("*.jpg"))
    real.append(dev / "real" / "liveportrait_d11.mp4")
    unrelated = scan_all(settings, [str(p) for p in real], workers=2)
    for result in unrelated:
        assert result.verdict is not None, (result.source, result.error)
        assert result.verdict.matches == [], result.source
        assert "match" not in result.verdict.decided_by

    # What a hash cannot tell: the face swap keeps its source clip's picture (6 bits),
    # so the real source "matches" the fake's entry. Once the source is listed as a
    # known original, the lists disagree on both, and neither is flagged on the match.
    source = dev / "real" / "ghost_orig.webp"
    swap = next(c for c, (f, how) in copies.items() if f.name == "ghost_swap_elon.webp")
    (before,) = scan_all(settings, [str(source)], workers=1)
    assert [m.entry for m in before.verdict.matches] == ["ghost_swap_elon.webp"]
    added = runner.invoke(
        app, ["hashes", "add", str(source), "--list", "originals", "--label", "authentic"]
    )
    assert added.exit_code == 0, added.output
    for result in scan_all(settings, [str(source), str(swap)], workers=1):
        verdict = result.verdict
        assert {m.label for m in verdict.matches} == {"fake", "authentic"}, result.source
        assert matching.CONFLICT_NOTE in verdict.notes
        match = next(s for s in verdict.signals if s.name == "match")
        assert match.decides == "review" and verdict.decision != "pass"
