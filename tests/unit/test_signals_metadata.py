"""Generator metadata: what front-ends and services write, and what hostile files do."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from synthwatch.operators.signals.metadata import (
    EVIDENCE_CHARS,
    HEAD_BYTES,
    MAX_TEXT_BYTES,
    GeneratorMetadata,
    generator_metadata,
)

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
MEMORY_BOUND = HEAD_BYTES + 8 * MAX_TEXT_BYTES
"""Peak Python allocation allowed while reading one hostile file: the head read, and a
few copies (bytes, str, evidence) of one capped text chunk."""
A1111 = (
    "a lighthouse at dusk, volumetric light\n"
    "Negative prompt: blurry\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0"}},
}
COMFY_WORKFLOW = {"last_node_id": 4, "nodes": [{"id": 3, "type": "KSampler"}], "links": []}


def _xmp(source_type: str = "", creator_tool: str = "") -> bytes:
    attrs = ""
    if creator_tool:
        attrs += f' xmp:CreatorTool="{creator_tool}"'
    if source_type:
        attrs += f' Iptc4xmpExt:DigitalSourceType="{source_type}"'
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        f'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"{attrs}/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def _png(tmp_path: Path, info: PngInfo, name: str = "image.png") -> Path:
    path = tmp_path / name
    Image.new("RGB", (16, 16), (30, 60, 90)).save(path, "PNG", pnginfo=info)
    return path


def _png_text(**text: str) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def _exif(**tags: str | bytes) -> Image.Exif:
    ids = {"Software": 0x0131, "Make": 0x010F, "Model": 0x0110, "Artist": 0x013B}
    exif = Image.Exif()
    for name, value in tags.items():
        if name == "UserComment":
            exif.get_ifd(0x8769)[0x9286] = value
        else:
            exif[ids[name]] = value
    return exif


def _saved(tmp_path: Path, name: str, fmt: str, **params: object) -> Path:
    path = tmp_path / name
    Image.new("RGB", (16, 16), (120, 40, 40)).save(path, fmt, **params)
    return path


# --- Stable Diffusion front-ends (PNG text chunks) --------------------------------------


def test_automatic1111_parameters_in_png_text(tmp_path: Path) -> None:
    meta = generator_metadata(_png(tmp_path, _png_text(parameters=A1111)))
    assert meta.generator == "AUTOMATIC1111" and meta.ai_declared
    assert meta.format == "png" and meta.error is None
    assert len(meta.evidence) == 1 and "parameters" in meta.evidence[0]
    assert "Steps: 30" in meta.evidence[0]


def test_forge_and_fooocus_are_told_apart_by_their_version_field(tmp_path: Path) -> None:
    forge = A1111.replace("Version: v1.10.1", "Version: f2.0.1v1.10.1-previous-313-g8a042934")
    fooocus = A1111.replace("Version: v1.10.1", "Version: Fooocus v2.5.5")
    assert (
        generator_metadata(_png(tmp_path, _png_text(parameters=forge), "f.png")).generator
        == "Forge"
    )
    assert (
        generator_metadata(_png(tmp_path, _png_text(parameters=fooocus), "o.png")).generator
        == "Fooocus"
    )


def test_compressed_ztxt_parameters_are_read(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("parameters", A1111, zip=True)
    meta = generator_metadata(_png(tmp_path, info))
    assert meta.generator == "AUTOMATIC1111"
    assert meta.evidence[0].startswith("PNG zTXt parameters")


def test_comfyui_prompt_and_workflow_graphs(tmp_path: Path) -> None:
    info = _png_text(prompt=json.dumps(COMFY_PROMPT), workflow=json.dumps(COMFY_WORKFLOW))
    meta = generator_metadata(_png(tmp_path, info))
    assert meta.generator == "ComfyUI" and meta.ai_declared
    assert any("prompt graph" in e for e in meta.evidence)
    assert any("workflow graph" in e for e in meta.evidence)


def test_unrelated_prompt_key_is_not_comfyui(tmp_path: Path) -> None:
    meta = generator_metadata(_png(tmp_path, _png_text(prompt="Say cheese")))
    assert meta == GeneratorMetadata(format="png")


def test_invokeai_metadata_key(tmp_path: Path) -> None:
    record = {"generation_mode": "txt2img", "positive_prompt": "a fox", "model": {"name": "sdxl"}}
    meta = generator_metadata(_png(tmp_path, _png_text(invokeai_metadata=json.dumps(record))))
    assert meta.generator == "InvokeAI" and meta.ai_declared


def test_novelai_software_and_comment_record(tmp_path: Path) -> None:
    comment = json.dumps({"prompt": "1girl", "steps": 28, "sampler": "k_euler", "uc": "lowres"})
    info = _png_text(Software="NovelAI", Source="NovelAI Diffusion V3 4BDE2A90", Comment=comment)
    meta = generator_metadata(_png(tmp_path, info))
    assert meta.generator == "NovelAI"
    assert any("Comment" in e for e in meta.evidence) and any(
        "Software" in e for e in meta.evidence
    )


def test_midjourney_job_id_in_description(tmp_path: Path) -> None:
    text = "a lighthouse --ar 16:9 --v 6.1 Job ID: 0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    meta = generator_metadata(_png(tmp_path, _png_text(Description=text)))
    assert meta.generator == "Midjourney"


def test_a_prompt_naming_a_generator_is_not_a_generator(tmp_path: Path) -> None:
    info = _png_text(Description="a castle in the style of Midjourney", Title="DALL-E homage")
    assert generator_metadata(_png(tmp_path, info)).generator is None


def test_png_itxt_xmp_with_ai_source_type(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp(IPTC + "trainedAlgorithmicMedia").decode(), zip=True)
    meta = generator_metadata(_png(tmp_path, info))
    assert meta.ai_declared and meta.generator is None
    assert meta.digital_source_type == IPTC + "trainedAlgorithmicMedia"


def test_text_chunks_after_the_image_data_are_read(tmp_path: Path) -> None:
    png = bytearray((_png(tmp_path, PngInfo())).read_bytes())
    body = b"parameters\x00" + A1111.encode()
    chunk = (
        struct.pack(">I", len(body))
        + b"tEXt"
        + body
        + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    )
    iend = png.rindex(b"IEND") - 4
    path = tmp_path / "late.png"
    path.write_bytes(bytes(png[:iend]) + chunk + bytes(png[iend:]))
    assert generator_metadata(path).generator == "AUTOMATIC1111"


# --- EXIF and XMP in JPEG, WebP, GIF, TIFF ----------------------------------------------


def test_camera_jpeg_names_no_generator(tmp_path: Path) -> None:
    exif = _exif(Make="Canon", Model="Canon EOS R5", Software="Digital Photo Professional")
    meta = generator_metadata(_saved(tmp_path, "camera.jpg", "JPEG", exif=exif))
    assert meta == GeneratorMetadata(format="jpeg")


@pytest.mark.parametrize(
    ("field", "value", "generator"),
    [
        ("Software", "Adobe Firefly", "Adobe Firefly"),
        ("Software", "Midjourney v6", "Midjourney"),
        ("Make", "OpenAI", "OpenAI DALL·E"),
        ("Artist", "Leonardo.Ai", "Leonardo.Ai"),
        ("Software", "Ideogram 2.0", "Ideogram"),
        ("Model", "FLUX.1 [dev]", "FLUX"),
    ],
)
def test_exif_tool_fields_naming_a_generator(
    tmp_path: Path, field: str, value: str, generator: str
) -> None:
    meta = generator_metadata(_saved(tmp_path, "gen.jpg", "JPEG", exif=_exif(**{field: value})))
    assert meta.generator == generator and meta.ai_declared
    assert meta.evidence == (f"EXIF {field}: {value!r} (names {generator})",)


def test_leonardo_the_painter_is_not_leonardo_ai(tmp_path: Path) -> None:
    path = _saved(tmp_path, "art.jpg", "JPEG", exif=_exif(Artist="Leonardo da Vinci"))
    assert generator_metadata(path).generator is None


def test_automatic1111_parameters_in_jpeg_user_comment(tmp_path: Path) -> None:
    # AUTOMATIC1111 saves JPEG parameters through piexif: code UNICODE, UTF-16 big-endian.
    comment = b"UNICODE\x00" + A1111.encode("utf-16-be")
    path = _saved(tmp_path, "a1111.jpg", "JPEG", exif=_exif(UserComment=comment))
    meta = generator_metadata(path)
    assert meta.generator == "AUTOMATIC1111"
    assert meta.evidence[0].startswith("EXIF UserComment: 'a lighthouse at dusk")


def test_jpeg_xmp_source_type_and_creator_tool(tmp_path: Path) -> None:
    xmp = _xmp(IPTC + "compositeWithTrainedAlgorithmicMedia", "Adobe Photoshop 25.0")
    meta = generator_metadata(_saved(tmp_path, "fill.jpg", "JPEG", xmp=xmp))
    assert meta.ai_declared and meta.generator is None  # Photoshop is not a generator
    assert meta.digital_source_type == IPTC + "compositeWithTrainedAlgorithmicMedia"
    assert any("declares generative AI" in e for e in meta.evidence)


def test_xmp_digital_capture_is_not_ai(tmp_path: Path) -> None:
    meta = generator_metadata(
        _saved(tmp_path, "cam.jpg", "JPEG", xmp=_xmp(IPTC + "digitalCapture"))
    )
    assert meta.ai_declared is False and meta.digital_source_type == IPTC + "digitalCapture"


def test_bare_source_type_term_is_accepted(tmp_path: Path) -> None:
    meta = generator_metadata(
        _saved(tmp_path, "b.webp", "WEBP", xmp=_xmp("trainedAlgorithmicMedia"))
    )
    assert meta.ai_declared and meta.format == "webp"


def test_webp_exif_software(tmp_path: Path) -> None:
    path = _saved(tmp_path, "g.webp", "WEBP", exif=_exif(Software="Google Imagen 3"))
    assert generator_metadata(path).generator == "Google Imagen"


def test_comfyui_webp_exif_graph(tmp_path: Path) -> None:
    # ComfyUI's WebP saver stores its graphs as EXIF strings prefixed "prompt:"/"workflow:".
    exif = _exif(
        Make="workflow:" + json.dumps(COMFY_WORKFLOW), Model="prompt:" + json.dumps(COMFY_PROMPT)
    )
    meta = generator_metadata(_saved(tmp_path, "c.webp", "WEBP", exif=exif))
    assert meta.generator == "ComfyUI"


def test_gif_comment_with_generation_parameters(tmp_path: Path) -> None:
    path = _saved(tmp_path, "anim.gif", "GIF", comment=A1111.encode())
    meta = generator_metadata(path)
    assert meta.generator == "AUTOMATIC1111" and meta.format == "gif" and meta.error is None


def test_tiff_software_tag(tmp_path: Path) -> None:
    path = _saved(tmp_path, "t.tiff", "TIFF", tiffinfo={0x0131: "Stable Diffusion 3.5"})
    meta = generator_metadata(path)
    assert meta.generator == "Stable Diffusion" and meta.format == "tiff"


def test_evidence_values_are_truncated(tmp_path: Path) -> None:
    long = A1111 + ", Extra: " + "x" * 5000
    meta = generator_metadata(_png(tmp_path, _png_text(parameters=long)))
    value = meta.evidence[0].split(": ", 1)[1]
    assert len(value) < EVIDENCE_CHARS + 60 and "…" in value


# --- hostile input ----------------------------------------------------------------------


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_with(tmp_path: Path, *chunks: bytes, end: bool = True) -> Path:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
    path = tmp_path / "hostile.png"
    tail = _chunk(b"IEND", b"") if end else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + tail)
    return path


def test_ztxt_decompression_bomb_is_capped(tmp_path: Path) -> None:
    bomb = zlib.compress(b"Steps: 1, Seed: 2, " + b"\x00" * (64 << 20), 9)  # 64 MiB inflated
    path = _png_with(tmp_path, _chunk(b"zTXt", b"parameters\x00\x00" + bomb))
    tracemalloc.start()
    started = time.monotonic()
    meta = generator_metadata(path)
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 5.0
    assert peak < MEMORY_BOUND, peak
    assert meta.error is None and meta.format == "png"


def test_huge_text_chunk_is_read_only_up_to_the_cap(tmp_path: Path) -> None:
    huge = b"parameters\x00" + A1111.encode() + b" " * (32 << 20)
    path = _png_with(tmp_path, _chunk(b"tEXt", huge))
    tracemalloc.start()
    meta = generator_metadata(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert meta.generator == "AUTOMATIC1111"  # its prefix still says so
    assert peak < MEMORY_BOUND, peak


def test_chunk_claiming_more_bytes_than_the_file_has(tmp_path: Path) -> None:
    lying = struct.pack(">I", 0x7FFFFFFF) + b"tEXt" + b"parameters\x00Steps: 1"
    path = _png_with(tmp_path, lying, end=False)
    meta = generator_metadata(path)
    assert meta.error is not None and "truncated" in meta.error
    assert meta.generator is None


def test_truncated_png_keeps_what_was_read_and_reports_it(tmp_path: Path) -> None:
    data = _png(tmp_path, _png_text(parameters=A1111)).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: data.index(b"IDAT") + 6])
    meta = generator_metadata(path)
    assert meta.generator == "AUTOMATIC1111" and meta.error is not None


def test_truncated_jpeg_inside_exif_reports_an_error(tmp_path: Path) -> None:
    data = _saved(tmp_path, "s.jpg", "JPEG", exif=_exif(Software="Midjourney")).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: data.index(b"Exif") + 20])
    meta = generator_metadata(path)
    assert meta.error is not None and meta.generator is None


def _jpeg_with_app1(tmp_path: Path, app1: bytes) -> Path:
    path = tmp_path / "bad.jpg"
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    path.write_bytes(b"\xff\xd8" + segment + b"\xff\xda\x00\x02" + b"\x00" * 16 + b"\xff\xd9")
    return path


def test_exif_with_a_bad_tiff_header_reports_an_error(tmp_path: Path) -> None:
    meta = generator_metadata(_jpeg_with_app1(tmp_path, b"Exif\x00\x00XX\x00*\x00\x00\x00\x08"))
    assert meta.error is not None and meta.error.startswith("corrupt EXIF")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")
def test_exif_with_offsets_past_its_end_yields_no_fields_and_no_exception(tmp_path: Path) -> None:
    # One IFD entry, Software, whose value offset points far outside the segment.
    ifd = b"\x00\x01" + b"\x01\x31\x00\x02\x7f\xff\xff\xff\x00\x00\x00\x20" + b"\x00" * 4
    meta = generator_metadata(
        _jpeg_with_app1(tmp_path, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + ifd)
    )
    assert meta == GeneratorMetadata(format="jpeg")


@pytest.mark.parametrize(
    "content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n", b"GIF89a\x01", b"RIFF\x00"]
)
def test_junk_never_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    meta = generator_metadata(path)
    assert meta.generator is None and meta.ai_declared is False


@pytest.mark.parametrize(
    "body",
    [
        b"<x:xmpmeta" * 400_000,  # packets that never close
        b"<x:xmpmeta>" + b" xmp:Software>" * 250_000 + b"</x:xmpmeta>",  # values never close
        b"<x:xmpmeta>" + b" a:DigitalSourceType=" * 150_000 + b"</x:xmpmeta>",
        b"<x:xmpmeta>" + b"a" * 3_000_000 + b"</x:xmpmeta>",
    ],
)
def test_pathological_xmp_is_scanned_in_linear_time(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "many.jpg"
    path.write_bytes(b"\xff\xd8\xff\xfe\x00\x04ab" + body)
    started = time.monotonic()
    generator_metadata(path)
    assert time.monotonic() - started < 2.0


def test_pathological_parameters_text_is_scanned_in_linear_time(tmp_path: Path) -> None:
    path = _png(tmp_path, _png_text(parameters="Steps: 1 " * 110_000))
    started = time.monotonic()
    meta = generator_metadata(path)
    assert time.monotonic() - started < 2.0
    assert meta.generator is None


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    meta = generator_metadata(tmp_path / "gone.png")
    assert meta.error is not None and meta.generator is None
