"""sniff: the media type comes from the bytes, and anything we cannot decode is None."""

from __future__ import annotations

from pathlib import Path

import pytest
from media_factory import encoder_available, make_animated, make_audio, make_image, make_video

from synthwatch.operators.sniff import EXTENSIONS, HEAD_BYTES, sniff


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\0\0\0\0" + b"".join(compatible)
    return (4 + len(body)).to_bytes(4, "big") + body + b"\0\0\0\x08free"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\0\x10JFIF\0", ("image/jpeg", "image")),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", ("image/png", "image")),
        (b"GIF89a\x01\0\x01\0", ("image/gif", "image")),
        (b"RIFF\x24\0\0\0WEBPVP8 ", ("image/webp", "image")),
        (b"RIFF\x24\0\0\0AVI LIST", ("video/x-msvideo", "video")),
        (b"RIFF\x24\0\0\0WAVEfmt ", ("audio/wav", "audio")),
        (b"II*\0\x08\0\0\0", ("image/tiff", "image")),
        (b"BM\x36\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0", ("image/bmp", "image")),
        (_ftyp(b"heic", b"mif1", b"heic"), ("image/heic", "image")),
        (_ftyp(b"avif", b"mif1", b"avif", b"miaf"), ("image/avif", "image")),
        (_ftyp(b"mif1", b"mif1", b"heic"), ("image/heif", "image")),
        (_ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), ("video/mp4", "video")),
        (_ftyp(b"qt  ", b"qt  "), ("video/quicktime", "video")),
        (_ftyp(b"3gp5", b"3gp5", b"isom"), ("video/3gpp", "video")),
        (_ftyp(b"M4A ", b"M4A ", b"mp42", b"isom"), ("audio/mp4", "audio")),
        (_ftyp(b"zzzz", b"zzzz", b"mp42"), ("video/mp4", "video")),  # unknown major brand
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", ("video/webm", "video")),
        (
            b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska",
            ("video/x-matroska", "video"),
        ),
        (b"FLV\x01\x05\0\0\0\x09", ("video/x-flv", "video")),
        (b"OggS\0\x02" + b"\0" * 22 + b"\x01\x1e\x01vorbis", ("audio/ogg", "audio")),
        (b"OggS\0\x02" + b"\0" * 22 + b"\x01\x2a\x80theora", ("video/ogg", "video")),
        (b"fLaC\0\0\0\x22", ("audio/flac", "audio")),
        (b"ID3\x04\0\0\0\0\0\x21", ("audio/mpeg", "audio")),
        (b"\xff\xfb\x90\x64\0\0", ("audio/mpeg", "audio")),  # MPEG-1 layer III frame header
        (b"\xff\xf1\x50\x80\x02\x1f\xfc", ("audio/aac", "audio")),  # ADTS
        ((b"\x47" + b"\0" * 187) * 4, ("video/mp2t", "video")),
    ],
)
def test_magic_bytes_name_the_format(head: bytes, expected: tuple[str, str]) -> None:
    assert sniff(head) == expected
    assert expected[0] in EXTENSIONS


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"<!doctype html><html>",
        b"%PDF-1.7\n",
        b"PK\x03\x04\x14\0",  # zip
        b"\x7fELF\x02\x01\x01",
        b'<svg xmlns="http://www.w3.org/2000/svg">',
        b"BMW owners club newsletter",  # "BM" text, not a bitmap
        b"RIFF\x24\0\0\0CDXA",  # RIFF, but not a form we decode
        b"\xff\xff\xff\xff\xff",  # 0xFF padding is not an MP3 frame
        b"GIF",
        (b"\x47" + b"\0" * 187) + b"\x47",  # one "packet" is not a transport stream
    ],
)
def test_non_media_bytes_are_not_recognised(head: bytes) -> None:
    assert sniff(head) is None


_REAL_FILES = [
    ("still.jpg", lambda p: make_image(p, fmt="JPEG"), "image/jpeg", "image"),
    ("still.png", lambda p: make_image(p, fmt="PNG"), "image/png", "image"),
    ("still.bmp", lambda p: make_image(p, fmt="BMP"), "image/bmp", "image"),
    ("still.tiff", lambda p: make_image(p, fmt="TIFF"), "image/tiff", "image"),
    # Animations are images here; the sampler decides to read them as video.
    ("anim.gif", lambda p: make_animated(p, "GIF", frames=3), "image/gif", "image"),
    ("anim.webp", lambda p: make_animated(p, "WEBP", frames=3), "image/webp", "image"),
    ("tone.wav", lambda p: make_audio(p, 0.2, "wav"), "audio/wav", "audio"),
    ("tone.flac", lambda p: make_audio(p, 0.2, "flac"), "audio/flac", "audio"),
    ("clip.mp4", lambda p: make_video(p, seconds=0.2, width=64, height=48), "video/mp4", "video"),
    (
        "clip.mkv",
        lambda p: make_video(p, seconds=0.2, width=64, height=48),
        "video/x-matroska",
        "video",
    ),
    (
        "clip.avi",
        lambda p: make_video(p, seconds=0.2, width=64, height=48, codec="mpeg4"),
        "video/x-msvideo",
        "video",
    ),
]


@pytest.mark.parametrize(("name", "make", "mime", "kind"), _REAL_FILES)
def test_files_written_by_real_encoders_are_recognised(
    tmp_path: Path, name: str, make: object, mime: str, kind: str
) -> None:
    assert callable(make)
    path = make(tmp_path / name)
    assert sniff(path.read_bytes()[:HEAD_BYTES]) == (mime, kind)


def test_mp3_written_by_lame_is_audio(tmp_path: Path) -> None:
    if not encoder_available("libmp3lame"):
        pytest.skip("PyAV build has no libmp3lame")
    path = make_audio(tmp_path / "tone.mp3", 0.2, "mp3")
    assert sniff(path.read_bytes()[:HEAD_BYTES]) == ("audio/mpeg", "audio")
