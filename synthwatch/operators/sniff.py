"""The real media type of a blob, from its first bytes, never from a name or a header.

Servers lie about Content-Type and file names lie about extensions; the decoder only
cares about the bytes. Only containers the sampler can open are recognised, everything
else is None and the caller raises `UnsupportedMedia`. Animated GIF/WebP are reported as
images: whether to sample them as video is the sampler's decision.
"""

from __future__ import annotations

from synthwatch.schemas import MediaType

HEAD_BYTES = 4096
"""How many leading bytes `sniff` may look at; fewer is fine for most formats."""

EXTENSIONS: dict[str, str] = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/heic": ".heic",
    "image/heif": ".heif",
    "image/avif": ".avif",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/3gpp": ".3gp",
    "video/3gpp2": ".3g2",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
    "video/mp2t": ".ts",
    "video/x-flv": ".flv",
    "video/ogg": ".ogv",
    "audio/mp4": ".m4a",
    "audio/ogg": ".ogg",
    "audio/wav": ".wav",
    "audio/flac": ".flac",
    "audio/mpeg": ".mp3",
    "audio/aac": ".aac",
}
"""File extension for each MIME type `sniff` can return (decoders probe better with one)."""

MEDIA_SUFFIXES = frozenset(EXTENSIONS.values()) | {".jpeg", ".tif", ".m4v", ".oga", ".opus"}
"""File names `scan DIR` picks up: every extension above and its common aliases. What a
file is, is still decided by its bytes."""

# ISO-BMFF brands (ftyp box). Image brands win over video brands because HEIF/AVIF files
# usually also list generic ISO brands such as `mif1` or `iso8`.
_IMAGE_BRANDS: dict[bytes, str] = {
    b"avif": "image/avif",
    b"avis": "image/avif",
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"heim": "image/heic",
    b"heis": "image/heic",
    b"mif1": "image/heif",
    b"msf1": "image/heif",
}
_AUDIO_BRANDS: dict[bytes, str] = {
    b"M4A ": "audio/mp4",
    b"M4B ": "audio/mp4",
    b"M4P ": "audio/mp4",
    b"F4A ": "audio/mp4",
    b"F4B ": "audio/mp4",
}
_VIDEO_BRANDS: dict[bytes, str] = {
    b"qt  ": "video/quicktime",
    b"3gp4": "video/3gpp",
    b"3gp5": "video/3gpp",
    b"3gp6": "video/3gpp",
    b"3gp7": "video/3gpp",
    b"3ge6": "video/3gpp",
    b"3ge7": "video/3gpp",
    b"3gg6": "video/3gpp",
    b"3g2a": "video/3gpp2",
    b"3g2b": "video/3gpp2",
    b"3g2c": "video/3gpp2",
    **{
        brand: "video/mp4"
        for brand in (
            b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso7", b"iso8", b"iso9",
            b"mp41", b"mp42", b"mp71", b"avc1", b"dash", b"M4V ", b"M4VH", b"M4VP",
            b"f4v ", b"MSNV", b"mmp4", b"NDAS", b"XAVC",
        )
    },
}  # fmt: skip


# Major-brand lookup order; a HEIF file names an image brand even when it also lists
# generic ISO brands, so images are looked for first.
_BRAND_TABLES: tuple[tuple[dict[bytes, str], MediaType], ...] = (
    (_IMAGE_BRANDS, "image"),
    (_AUDIO_BRANDS, "audio"),
    (_VIDEO_BRANDS, "video"),
)


def _ftyp(head: bytes) -> tuple[str, MediaType] | None:
    size = int.from_bytes(head[0:4], "big")
    major = head[8:12]
    # The major brand says what the file is; compatible brands only say what a reader may
    # assume, so they are consulted only when the major brand is unknown.
    for table, kind in _BRAND_TABLES:
        if major in table:
            return table[major], kind
    end = min(size, len(head))
    compatible = [head[i : i + 4] for i in range(16, end - 3, 4)]
    for table, kind in _BRAND_TABLES:
        for brand in compatible:
            if brand in table:
                return table[brand], kind
    return None


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (plain text starts with it); the DIB header size is one of a
    # few fixed values and the reserved fields are zero in every real encoder's output.
    dib_size = int.from_bytes(head[14:18], "little")
    return head[6:10] == b"\0\0\0\0" and dib_size in (12, 40, 52, 56, 64, 108, 124)


def _mpeg_audio(head: bytes) -> tuple[str, MediaType] | None:
    """An MPEG audio frame (MP3) or AAC ADTS frame at offset 0, fields validated."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    if head[1] & 0xF6 == 0xF0:  # ADTS: 12-bit sync, layer bits 00
        sampling_index = (head[2] >> 2) & 0x0F
        return ("audio/aac", "audio") if sampling_index < 13 else None
    version = (head[1] >> 3) & 0x03
    layer = (head[1] >> 1) & 0x03
    bitrate = head[2] >> 4
    sample_rate = (head[2] >> 2) & 0x03
    # Reserved values (and the rarely used "free" bitrate 0) rule out most stray 0xFF bytes.
    if version == 1 or layer == 0 or bitrate in (0, 15) or sample_rate == 3:
        return None
    return "audio/mpeg", "audio"


def _is_mpegts(head: bytes, offset: int, packet: int) -> bool:
    positions = range(offset, len(head), packet)
    return len(positions) >= 3 and all(head[p] == 0x47 for p in positions[:8])


def sniff(head: bytes) -> tuple[str, MediaType] | None:
    """(MIME type, media type) of a blob from its first bytes (up to `HEAD_BYTES`), or None.

    None means "not a format we decode"; the caller raises `UnsupportedMedia`.
    ISO-BMFF files are classified by brand, so an MP4 with only an audio track and a
    generic brand is reported as video; the sampler finds out it has no frames.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "image"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "image"
    if head.startswith(b"RIFF") and len(head) >= 12:
        form = head[8:12]
        if form == b"WEBP":
            return "image/webp", "image"
        if form == b"AVI ":
            return "video/x-msvideo", "video"
        if form == b"WAVE":
            return "audio/wav", "audio"
        return None
    if head.startswith((b"II*\0", b"MM\0*")):
        return "image/tiff", "image"
    if head.startswith(b"BM") and _is_bmp(head):
        return "image/bmp", "image"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _ftyp(head)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        # DocType element (0x4282, 4-byte size) names the flavour of Matroska.
        if b"\x42\x82\x84webm" in head[:128]:
            return "video/webm", "video"
        return "video/x-matroska", "video"
    if head.startswith(b"FLV\x01"):
        return "video/x-flv", "video"
    if head.startswith(b"OggS"):
        # The first page carries the first stream's identification header.
        if b"\x80theora" in head[:512]:
            return "video/ogg", "video"
        return "audio/ogg", "audio"
    if head.startswith(b"fLaC"):
        return "audio/flac", "audio"
    if head.startswith(b"ID3") and len(head) >= 10 and head[3] in (2, 3, 4):
        return "audio/mpeg", "audio"
    if _is_mpegts(head, 0, 188) or _is_mpegts(head, 4, 192):
        return "video/mp2t", "video"
    return _mpeg_audio(head)
