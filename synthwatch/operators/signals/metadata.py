"""What a file's own metadata says about the software that made it.

Most generated images are published as their generator wrote them: Stable Diffusion
front-ends store the full generation parameters in PNG text chunks (or EXIF UserComment
for JPEG/WebP), hosted services stamp EXIF `Software` or XMP `xmp:CreatorTool`, and
Adobe Firefly and Google's Imagen write the IPTC digital source type
`trainedAlgorithmicMedia` into XMP (IPTC's 2023 guidance on generative AI). Metadata is
trivially stripped or forged, so its presence is strong evidence and its absence none.

Only container metadata is read, never pixels, and every read is bounded: at most
HEAD_BYTES from the start of the file (PNG is walked chunk by chunk with seeks, reading
only chunk headers and text chunks), MAX_TEXT_BYTES per text chunk before and after
decompression, and MAX_TOTAL_TEXT for the whole file. A hostile file (truncated, with
huge or bomb-compressed text chunks, corrupt EXIF) yields what was read before the damage
and an `error`; it never raises, hangs or inflates. EXIF that Pillow can half-parse (it
skips entries pointing past the segment, with a warning) yields the entries it kept.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image

from synthwatch.operators.signals import iptc

HEAD_BYTES = 4 << 20
MAX_TEXT_BYTES = 1 << 20
MAX_TOTAL_TEXT = 4 << 20
MAX_PNG_CHUNKS = 100_000
MAX_XMP_PACKETS = 8
EVIDENCE_CHARS = 200

GENERATOR_NAMES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("Midjourney", r"\bmidjourney\b"),
        (
            "OpenAI DALL·E",
            r"\bdall[\s·.\-]?e\b|\bopenai\b|\bchatgpt\b|\bgpt-image|\bbing image creator\b",
        ),
        ("Adobe Firefly", r"\bfirefly\b"),
        ("Google Imagen", r"\bimagen\b|\bgemini\b|\bgoogle ai\b"),
        ("FLUX", r"\bflux(?:\.1)?\b|\bblack forest labs\b"),
        ("NovelAI", r"\bnovel\s?ai\b"),
        ("Leonardo.Ai", r"\bleonardo[\s.]?ai\b"),
        ("Ideogram", r"\bideogram\b"),
        ("Runway", r"\brunway(?:\s?ml)?\b"),
        ("ComfyUI", r"\bcomfyui\b"),
        ("InvokeAI", r"\binvoke\s?ai\b"),
        ("Fooocus", r"\bfooocus\b"),
        ("AUTOMATIC1111", r"\bautomatic1111\b"),
        (
            "Stable Diffusion",
            r"\bstable[\s_-]?diffusion\b|\bsdxl\b|\bdreamstudio\b|\bstability\.?\s?ai\b",
        ),
        ("Krea", r"\bkrea(?:\.ai|\s?ai)\b"),
        ("Playground", r"\bplayground\s?(?:ai|v\d)\b"),
        ("Recraft", r"\brecraft\b"),
        ("Meta AI", r"\bmeta ai\b|\bimagine with meta\b"),
        ("xAI Grok", r"\bgrok\b"),
        ("Draw Things", r"\bdraw things\b"),
        ("DiffusionBee", r"\bdiffusionbee\b"),
        ("Civitai", r"\bcivitai\b"),
    )
)
"""Known generators, matched only in fields that name a tool (EXIF Software/Make/Model/
Artist, XMP CreatorTool/Credit, PNG Software/Source): a prompt that says "in the style of
Midjourney" must not count, so free-text fields are never searched for names."""

# EXIF tags (TIFF 6.0 / EXIF 2.32) and Pillow's numbering of the EXIF sub-IFD.
_TOOL_TAGS = {0x0131: "Software", 0x010F: "Make", 0x0110: "Model", 0x013B: "Artist"}
_TEXT_TAGS = {0x010E: "ImageDescription"}
_EXIF_IFD, _USER_COMMENT, _XMP_TAG = 0x8769, 0x9286, 0x02BC

_PNG_TOOL_KEYS = frozenset({"software", "source"})
_PARAM_KEYS = frozenset({"parameters", "usercomment", "imagedescription", "comment", "description"})
_INVOKEAI_KEYS = frozenset(
    {"invokeai_metadata", "invokeai_graph", "invokeai_workflow", "sd-metadata", "dream"}
)
_A1111_STEPS = re.compile(r"\bSteps: \d+")
_A1111_KEYS = ("Sampler: ", "CFG scale: ", "Seed: ")
_A1111_VERSION = re.compile(r"\bVersion: ([^,\n]+)")
_MIDJOURNEY_JOB = re.compile(r"\bJob ID: [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-", re.IGNORECASE)
# XMP properties as attributes (prefix:Name="v"), elements (<prefix:Name>v<) or resources
# (rdf:resource="v"). Values are length-bounded and possessive (no backtracking), so a
# hostile packet with thousands of unterminated openings costs linear, not quadratic, time.
_XMP_TOOL = re.compile(
    r"[:<\s](CreatorTool|Software|Credit)(?:\s{0,8}=\s{0,8}\"([^\"<]{0,300}+)\"|>([^<]{0,300}+)<)"
)
_XMP_SOURCE_TYPE = re.compile(
    r"[:<\s]DigitalSourceType(?:\s{0,8}=\s{0,8}\"([^\"<]{0,300}+)\""
    r"|\s{1,8}rdf:resource=\"([^\"<]{0,300}+)\"|>([^<]{0,300}+)<)"
)
_XMP_OPEN, _XMP_CLOSE = b"<x:xmpmeta", b"</x:xmpmeta>"


@dataclass(frozen=True)
class GeneratorMetadata:
    """A generator named by the file's metadata, and the fields that named it.

    `generator` is a normalised name from GENERATOR_NAMES or a Stable Diffusion front-end
    (AUTOMATIC1111, Forge, Fooocus, SD.Next, ComfyUI, InvokeAI, NovelAI); it names the
    software that wrote the metadata, the model it ran is left in `evidence`.
    `ai_declared` is true when a generator is named or the digital source type declares
    generative AI. `format` is None for a container other than JPEG, PNG, WebP, GIF and
    TIFF, where only a raw XMP packet is looked for.
    """

    generator: str | None = None
    ai_declared: bool = False
    digital_source_type: str | None = None
    evidence: tuple[str, ...] = ()
    format: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Field:
    where: str  # "PNG tEXt", "EXIF", "XMP", ...
    key: str
    value: str


def generator_metadata(path: Path) -> GeneratorMetadata:
    """Read `path`'s metadata (bounded, no pixel decoding) and name its generator."""
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
            fmt, fields, error = _container_fields(fh, head)
    except OSError as exc:
        return GeneratorMetadata(error=f"cannot read {path.name}: {exc}")
    fields.extend(_xmp_fields(head, fields))
    return _judge(fields, fmt, error)


def _container_fields(fh: IO[bytes], head: bytes) -> tuple[str | None, list[_Field], str | None]:
    fields: list[_Field] = []
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png", fields, _png_fields(fh, fields)
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg", fields, _jpeg_fields(head, len(head) < HEAD_BYTES, fields)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", fields, _webp_fields(head, fields)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif", fields, _gif_fields(head, fields)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff", fields, _exif_fields(head, fields)
    return None, fields, None


# --- containers -------------------------------------------------------------------------


def _png_fields(fh: IO[bytes], fields: list[_Field]) -> str | None:
    """Walk PNG chunks by seeking past everything but text and eXIf chunks.

    Chunks after IDAT are read too (Pillow's `open` stops at IDAT): some tools append
    their metadata after the image data.
    """
    fh.seek(8)
    budget = MAX_TOTAL_TEXT
    for _ in range(MAX_PNG_CHUNKS):
        header = fh.read(8)
        if len(header) < 8:
            return "truncated PNG: no IEND chunk"
        length, ctype = struct.unpack(">I4s", header)
        if ctype == b"IEND":
            return None
        if ctype not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            fh.seek(length + 4, 1)  # data and CRC
            continue
        # An oversized text chunk is read up to the cap (a prefix still names its writer).
        wanted = max(0, min(length, MAX_TEXT_BYTES, budget))
        data = fh.read(wanted)
        fh.seek(length - wanted + 4, 1)
        if len(data) < wanted:
            return f"truncated PNG: {ctype.decode()} chunk cut short"
        budget -= wanted
        if ctype == b"eXIf":
            error = _exif_fields(data, fields)
            if error:
                return error
            continue
        parsed = _png_text(ctype, data)
        if parsed is None:
            continue
        key, text = parsed
        budget -= len(text)
        fields.append(_Field(f"PNG {ctype.decode()}", key, text))
        if budget <= 0:
            return "PNG text exceeds the metadata budget; the rest was not read"
    return f"PNG has more than {MAX_PNG_CHUNKS} chunks; the rest was not read"


def _png_text(ctype: bytes, data: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt/zTXt/iTXt chunk (PNG spec 3rd ed., 11.3.3), or None."""
    key, sep, rest = data.partition(b"\x00")
    if not sep or not key:
        return None
    keyword = key.decode("latin-1")
    if ctype == b"tEXt":
        return keyword, rest.decode("latin-1")
    if ctype == b"zTXt":
        text = _inflate(rest[1:]) if rest[:1] == b"\x00" else None
        return (keyword, text.decode("latin-1")) if text is not None else None
    if len(rest) < 2:
        return None
    compressed, method = rest[0], rest[1]
    _lang, _, rest = rest[2:].partition(b"\x00")
    _translated, _, body = rest.partition(b"\x00")
    if compressed:
        inflated = _inflate(body) if method == 0 else None
        if inflated is None:
            return None
        body = inflated
    return keyword, body.decode("utf-8", errors="replace")


def _inflate(data: bytes) -> bytes | None:
    """zlib-decompress at most MAX_TEXT_BYTES: a 1 KiB bomb must not become 1 GiB."""
    try:
        return zlib.decompressobj().decompress(data, MAX_TEXT_BYTES)
    except zlib.error:
        return None


def _jpeg_fields(head: bytes, whole_file: bool, fields: list[_Field]) -> str | None:
    """Walk JPEG marker segments up to the first scan (ITU T.81, B.1.1)."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return f"corrupt JPEG: no marker at byte {pos}"
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: metadata is over
            return None
        length = int.from_bytes(head[pos + 2 : pos + 4], "big")
        payload = head[pos + 4 : pos + 2 + length]
        if length < 2 or len(payload) < length - 2:
            return "truncated JPEG: metadata segment cut short" if whole_file else None
        if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            error = _exif_fields(payload, fields)
            if error:
                return error
        elif marker == 0xFE:
            fields.append(_Field("JPEG", "Comment", payload.decode("utf-8", errors="replace")))
        pos += 2 + length
    return "truncated JPEG: no image data" if whole_file else None


def _webp_fields(head: bytes, fields: list[_Field]) -> str | None:
    """Walk RIFF chunks of a WebP (Google WebP container spec); EXIF lives in 'EXIF'."""
    pos = 12
    while pos + 8 <= len(head):
        fourcc, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if fourcc == b"EXIF":
            payload = head[pos + 8 : pos + 8 + size]
            if len(payload) < size:
                return "truncated WebP: EXIF chunk cut short"
            error = _exif_fields(payload, fields)
            if error:
                return error
        pos += 8 + size + (size & 1)
    return None


def _gif_fields(head: bytes, fields: list[_Field]) -> str | None:
    """Walk GIF blocks (GIF89a spec, sections 17-27) collecting comment extensions.

    XMP in a GIF sits in an application extension laid out so that the packet is
    contiguous in the file; the raw XMP scan finds it, so it is not reassembled here.
    """
    pos = 13
    if len(head) < pos:
        return "truncated GIF header"
    packed = head[10]
    if packed & 0x80:
        pos += 3 << ((packed & 7) + 1)
    while pos < len(head):
        block = head[pos]
        if block == 0x3B:  # trailer
            return None
        if block == 0x21 and pos + 1 < len(head):
            label = head[pos + 1]
            data, pos = _gif_sub_blocks(head, pos + 2)
            if label == 0xFE:
                fields.append(_Field("GIF", "Comment", data.decode("latin-1")))
        elif block == 0x2C:
            if pos + 10 > len(head):
                break
            packed = head[pos + 9]
            pos += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0) + 1
            _, pos = _gif_sub_blocks(head, pos)
        else:
            return f"corrupt GIF: unexpected byte 0x{block:02x} at {pos}"
    return None if len(head) == HEAD_BYTES else "truncated GIF: no trailer"


def _gif_sub_blocks(head: bytes, pos: int) -> tuple[bytes, int]:
    """Concatenated data sub-blocks from `pos` (capped at MAX_TEXT_BYTES) and the end."""
    parts: list[bytes] = []
    kept = 0
    while pos < len(head):
        size = head[pos]
        pos += 1
        if size == 0:
            break
        if kept < MAX_TEXT_BYTES:
            parts.append(head[pos : pos + size])
            kept += size
        pos += size
    return b"".join(parts), pos


def _exif_fields(data: bytes, fields: list[_Field]) -> str | None:
    """Tool and free-text fields of an EXIF/TIFF structure (with or without 'Exif\\0\\0')."""
    exif = Image.Exif()
    try:
        exif.load(data)
        ifd0 = dict(exif)
        sub = dict(exif.get_ifd(_EXIF_IFD))
    except Exception as exc:  # Pillow's IFD parser raises many types on corrupt input
        return f"corrupt EXIF: {type(exc).__name__}: {exc}"
    for tag, name in (_TOOL_TAGS | _TEXT_TAGS).items():
        value = _exif_text(ifd0.get(tag))
        if value:
            fields.append(_Field("EXIF", name, value))
    comment = _user_comment(sub.get(_USER_COMMENT))
    if comment:
        fields.append(_Field("EXIF", "UserComment", comment))
    xmp = ifd0.get(_XMP_TAG)
    if isinstance(xmp, tuple) and all(isinstance(b, int) for b in xmp):
        xmp = bytes(xmp)  # TIFF type BYTE comes back as a tuple
    if isinstance(xmp, bytes | str):
        raw = xmp.encode("utf-8") if isinstance(xmp, str) else xmp
        fields.extend(_Field("EXIF", "XMP", text) for text in _xmp_packets(raw))
    return None


def _exif_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.strip("\x00 \t\r\n") if isinstance(value, str) else ""


def _user_comment(value: Any) -> str:
    """Decode EXIF UserComment: an 8-byte character code, then the text (EXIF 2.32, 4.6.5).

    AUTOMATIC1111 writes its parameters here with code UNICODE through piexif, which
    encodes UTF-16 big-endian whatever the TIFF byte order; both orders are tried and the
    one that reads as more ASCII wins.
    """
    if isinstance(value, str):
        return value.strip("\x00 ")
    if not isinstance(value, bytes) or len(value) < 8:
        return ""
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        candidates = [body.decode(enc, errors="replace") for enc in ("utf-16-be", "utf-16-le")]
        text = max(candidates, key=lambda t: sum(c.isascii() and c.isprintable() for c in t))
    elif code.startswith(b"JIS"):
        text = body.decode("shift_jis", errors="replace")
    else:  # ASCII, or undefined (all zeros), which in practice is UTF-8
        text = body.decode("utf-8", errors="replace")
    return text.strip("\x00 ")


# --- XMP --------------------------------------------------------------------------------


def _xmp_fields(head: bytes, fields: list[_Field]) -> Iterator[_Field]:
    """XMP packets found raw in the head, plus those inside PNG text/EXIF fields."""
    texts = list(_xmp_packets(head))
    for f in fields:
        if f.key in ("XML:com.adobe.xmp", "XMP"):
            texts.append(f.value)
    seen: set[str] = set()
    for text in texts:
        if text in seen:
            continue
        seen.add(text)
        for m in _XMP_TOOL.finditer(text):
            value = (m.group(2) or m.group(3) or "").strip()
            if value:
                yield _Field("XMP", m.group(1), value)
        for m in _XMP_SOURCE_TYPE.finditer(text):
            value = (m.group(1) or m.group(2) or m.group(3) or "").strip()
            if value:
                yield _Field("XMP", "DigitalSourceType", value)


def _xmp_packets(data: bytes) -> Iterator[str]:
    """Raw `<x:xmpmeta>` packets in `data`, found with linear scans (no backtracking)."""
    start = 0
    for _ in range(MAX_XMP_PACKETS):
        begin = data.find(_XMP_OPEN, start)
        if begin < 0:
            return
        end = data.find(_XMP_CLOSE, begin)
        if end < 0:
            return
        end += len(_XMP_CLOSE)
        yield data[begin:end].decode("utf-8", errors="replace")
        start = end


# --- judgement --------------------------------------------------------------------------


def _judge(fields: list[_Field], fmt: str | None, error: str | None) -> GeneratorMetadata:
    found: list[tuple[int, str, str]] = []  # (rank, generator, evidence); rank 0 is strongest
    evidence: list[str] = []
    source_type: str | None = None
    for f in fields:
        if f.key in ("XML:com.adobe.xmp", "XMP"):
            continue
        if f.key == "DigitalSourceType":
            source_type = source_type or f.value
            ai = iptc.term(f.value) in iptc.GENERATIVE_AI
            evidence.append(_say(f, "declares generative AI" if ai else "not a generative-AI type"))
            continue
        hit = _structured(f) or _tool_name(f)
        if hit:
            rank, name, why = hit
            found.append((rank, name, _say(f, why)))
    for _, _, line in sorted(found, key=lambda item: item[0]):
        evidence.append(line)
    generator = min(found, key=lambda item: item[0])[1] if found else None
    ai_declared = generator is not None or (
        source_type is not None and iptc.term(source_type) in iptc.GENERATIVE_AI
    )
    return GeneratorMetadata(
        generator=generator,
        ai_declared=ai_declared,
        digital_source_type=source_type,
        evidence=tuple(dict.fromkeys(evidence)),
        format=fmt,
        error=error,
    )


def _structured(f: _Field) -> tuple[int, str, str] | None:
    """Generation records only generators write: parameters, node graphs, job ids."""
    key = f.key.lower()
    value = f.value
    if key in _INVOKEAI_KEYS and f.where.startswith("PNG"):
        return 0, "InvokeAI", "InvokeAI generation metadata"
    graph = _comfy_graph(key, value)
    if graph:
        return 0, "ComfyUI", graph
    if key == "comment" and f.where.startswith("PNG"):
        record = _json_object(value)
        if record and {"steps", "sampler"} <= record.keys() and "uc" in record:
            return 0, "NovelAI", "NovelAI generation record (steps, sampler, uc)"
    if key in _PARAM_KEYS and _a1111_parameters(value):
        return 1, _a1111_front_end(value), "Stable Diffusion generation parameters"
    if key in ("description", "comment", "imagedescription") and _MIDJOURNEY_JOB.search(value):
        return 1, "Midjourney", "Midjourney job id"
    return None


def _comfy_graph(key: str, value: str) -> str | None:
    """ComfyUI saves its API graph as 'prompt' and its UI graph as 'workflow' (PNG text),
    or, for WebP/JPEG savers, as EXIF strings prefixed 'prompt:' / 'workflow:'."""
    for prefix in ("prompt:", "workflow:"):
        if value[: len(prefix)].lower() == prefix:
            key, value = prefix[:-1], value[len(prefix) :]
    if key not in ("prompt", "workflow"):
        return None
    graph = _json_object(value)
    if graph is None:  # cut at MAX_TEXT_BYTES, or not JSON: fall back on ComfyUI's own keys
        if key == "prompt" and '"class_type"' in value and '"inputs"' in value:
            return "ComfyUI prompt graph (not parsed whole)"
        if key == "workflow" and '"nodes"' in value and '"links"' in value:
            return "ComfyUI workflow graph (not parsed whole)"
        return None
    if key == "workflow" and isinstance(graph.get("nodes"), list):
        return "ComfyUI workflow graph"
    nodes = [n for n in graph.values() if isinstance(n, dict)]
    if nodes and all("class_type" in n for n in nodes):
        return "ComfyUI prompt graph"
    return None


def _a1111_parameters(text: str) -> bool:
    """AUTOMATIC1111's format: 'Steps: N', then Sampler / CFG scale / Seed fields."""
    steps = _A1111_STEPS.search(text)
    return steps is not None and any(text.find(k, steps.end()) >= 0 for k in _A1111_KEYS)


def _a1111_front_end(parameters: str) -> str:
    """Which AUTOMATIC1111-format writer made `parameters`, from its Version field."""
    version = _A1111_VERSION.search(parameters)
    tag = version.group(1).strip() if version else ""
    if "fooocus" in tag.lower() or "Fooocus" in parameters:
        return "Fooocus"
    if re.match(r"f\d", tag):  # Forge versions read like "f2.0.1v1.10.1-previous-..."
        return "Forge"
    if "SD.Next" in parameters or "sdnext" in tag.lower():
        return "SD.Next"
    return "AUTOMATIC1111"


def _tool_name(f: _Field) -> tuple[int, str, str] | None:
    tool_field = (
        (f.where == "EXIF" and f.key in _TOOL_TAGS.values())
        or (f.where == "XMP" and f.key in ("CreatorTool", "Software", "Credit"))
        or (f.where.startswith("PNG") and f.key.lower() in _PNG_TOOL_KEYS)
    )
    if not tool_field:
        return None
    for name, pattern in GENERATOR_NAMES:
        if pattern.search(f.value):
            return 2, name, f"names {name}"
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _say(f: _Field, why: str) -> str:
    value = " ".join(f.value.split())
    if len(value) > EVIDENCE_CHARS:
        value = value[: EVIDENCE_CHARS - 1] + "…"
    return f"{f.where} {f.key}: {value!r} ({why})"
