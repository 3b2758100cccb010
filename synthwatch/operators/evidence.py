"""Write a signed forensic evidence bundle for a decided verdict: frames, report, manifest.

Layout under `<prefix>/<name>_<alert_id>/` (or without `<prefix>/`), where `<name>` is
a readable prefix from the item's file name (`bundle_name`):

- `<sha256[:16]>_frame_<n>_<t>s.jpg`: the frames that drove the score, face boxes drawn
  with each crop's score;
- `<sha256[:16]>_frame_<n>_<t>s_<what>.png`: beside each frame, the images that explain
  it: a heatmap (RISE or occlusion) per flagged face or whole frame, forensic maps (error level,
  residual spectrum) for images;
- `<sha256[:16]>_report.json`: the verdict with its per-frame timeline and the tool version
  (its `url` and `source` redacted as in the alert: no credentials, no URL signatures);
- `<sha256[:16]>_report.html`: the same document as a self-contained page for people,
  with the frames, heatmaps, plots and what the decision means (`report.py`);
- `manifest.json`: every object's name, key, sha256 and size; the media sha256, source,
  decision, tool, model and weights versions, policy version; the signing key's id;
- `manifest.sig.json`: the Ed25519 signature of the manifest's bytes (`signing.py`), with
  the key id and public key; the public key is also published as `<prefix>/keys/<id>.pem`.

Object keys carry their own content hash and the bundle lives under a folder derived
from the verdict, so keys derive from hashes only. Every write is write-once; the
manifest is written after the objects and the signature last: it is the commit point. A
retry after a crash re-writes missing objects (same keys when the content is the same;
new keys and orphans when it differs, which `verify` reports as added) and, if the
manifest already exists, keeps the stored one, signs it and returns its hash.
`verify_bundle` checks the signature, every listed object and that nothing was added.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image, ImageDraw, ImageFont

from synthwatch import __version__
from synthwatch.errors import ConfigError, InvalidRef
from synthwatch.operators import report as report_html
from synthwatch.operators.redact import redact_urls
from synthwatch.operators.signing import (
    ALGORITHM,
    SIGNATURE_NAME,
    Signer,
    check_signature,
    key_id,
    load_public,
    signature_document,
)
from synthwatch.operators.store import ObjectStore, sha256_bytes
from synthwatch.schemas import FrameResult, Verdict, to_builtins

MAX_EVIDENCE_FRAMES = 8
MANIFEST_SCHEMA = "synthwatch.evidence_manifest.v2"
REPORT_SCHEMA = "synthwatch.report.v1"


@dataclass(frozen=True)
class Overlay:
    """An image explaining a frame: saved beside it as `<frame>_<name>.png`."""

    name: str
    """Short file-name part, e.g. `heatmap_face0`, `ela`."""
    role: str
    """Manifest role, e.g. `heatmap`, `forensic_map`."""
    png: bytes
    note: str = ""


@dataclass(frozen=True)
class EvidenceFrame:
    time_s: float
    image: npt.NDArray[np.uint8]
    overlays: tuple[Overlay, ...] = ()


@dataclass(frozen=True)
class Bundle:
    manifest_key: str
    manifest_uri: str
    manifest_sha256: str
    created: bool
    """False when the manifest was already there (a retry); the stored one is kept."""


def driving_frames(verdict: Verdict, limit: int = MAX_EVIDENCE_FRAMES) -> list[FrameResult]:
    """The highest-scoring frames, in time order: what an analyst should look at first."""
    top = sorted(verdict.frames, key=lambda f: f.score, reverse=True)[:limit]
    return sorted(top, key=lambda f: f.time_s)


def annotate(
    image: npt.NDArray[np.uint8],
    frame: FrameResult,
    *,
    review: float = 0.5,
    flag: float = 0.8,
) -> bytes:
    """JPEG of the frame: each face boxed and labelled `face <n>: <score>`, and under
    the picture a caption strip with the frame's time and score.

    The numbers are the ones report.html and report.json show (`report.score_text`):
    one number per face and per frame. Labels sit on filled boxes in a font sized to the
    image, so they stay legible on a busy picture and on a 4K frame alike; the caption
    is below the picture, not on it, so it hides no face and pixel coordinates (the
    face boxes in report.json) still count from the picture's top-left corner. Box
    colours follow the policy's thresholds (`review`, `flag`), as in the report.
    """
    picture = Image.fromarray(image).convert("RGB")
    font = ImageFont.load_default(size=label_size(picture.size))
    width = max(2, round(max(picture.size) / 400))
    draw = ImageDraw.Draw(picture, "RGBA")
    for i, face in enumerate(frame.faces):
        colour = score_colour(face.score, review=review, flag=flag)
        draw.rectangle((face.x0, face.y0, face.x1, face.y1), outline=colour, width=width)
        _label(
            draw,
            (face.x0, face.y0),
            f"{report_html.face_name(face, i)}: {report_html.score_text(face.score)}",
            font,
            bounds=picture.size,
            background=(*colour, 230),
        )
    caption, font = _caption(
        draw,
        [
            f"t = {report_html.time_text(frame.time_s)}",
            f"frame score {report_html.score_text(frame.score)}",
        ],
        font,
        picture.width,
    )
    left, top, _right, bottom = draw.multiline_textbbox((0, 0), caption, font=font, spacing=4)
    pad = max(4, width * 2)
    strip = round(bottom - top) + 2 * pad
    out = Image.new("RGB", (picture.width, picture.height + strip), (20, 20, 20))
    out.paste(picture, (0, 0))
    ImageDraw.Draw(out).multiline_text(
        (pad - left, picture.height + pad - top),
        caption,
        fill=(255, 255, 255),
        font=font,
        spacing=4,
    )
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def label_size(size: tuple[int, int]) -> int:
    """Label font size in pixels: a 24th of the shorter side, 12 to 48, so a 1080p frame
    shown 560 px wide in the report still reads at about 13 px."""
    return max(12, min(48, round(min(size) / 24)))


def score_colour(score: float, *, review: float, flag: float) -> tuple[int, int, int]:
    """Red at or above `flag`, orange at or above `review`, green below: the report's
    colours, so a box means the same in the picture and on the page."""
    hex_colour = (
        report_html.FLAG_COLOUR
        if score >= flag
        else report_html.REVIEW_COLOUR
        if score >= review
        else report_html.PASS_COLOUR
    )
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return r, g, b


def _caption(
    draw: ImageDraw.ImageDraw,
    parts: Sequence[str],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: int,
) -> tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    """The caption on one line if it fits `width`, else one part per line, in a
    smaller font on a picture too narrow for even that."""
    margin = 8
    one = "    ".join(parts)
    if draw.textlength(one, font=font) <= width - margin:
        return one, font
    lines = "\n".join(parts)
    size = label_size((width, width))
    while size > 6 and max(draw.textlength(p, font=font) for p in parts) > width - margin:
        size -= 1
        font = ImageFont.load_default(size=size)
    return lines, font


def _label(
    draw: ImageDraw.ImageDraw,
    at: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    *,
    bounds: tuple[int, int],
    background: tuple[int, int, int, int],
) -> None:
    """White text on a filled box standing on the point `at` (a face box's top-left
    corner), or hanging from it when there is no room above; kept within `bounds` (the
    picture's width and height)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, round((bottom - top) / 5))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, at[0]), max(0.0, bounds[0] - w))
    y = at[1] - h if at[1] - h >= 0 else at[1]
    y = min(max(0.0, y), max(0.0, bounds[1] - h))
    draw.rectangle((x, y, x + w, y + h), fill=background)
    draw.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)


SAME_FRAME_S = 0.5
"""A decoded frame this close to a timeline entry's time is taken to be that frame."""


def closest(frames: Sequence[EvidenceFrame], t: float) -> EvidenceFrame | None:
    """The frame shown at `t`: the nearest one within `SAME_FRAME_S`, else None."""
    best = min(frames, key=lambda f: abs(f.time_s - t), default=None)
    return best if best is not None and abs(best.time_s - t) < SAME_FRAME_S else None


def bundle_name(verdict: Verdict, alert_id: str) -> str:
    """The bundle's folder name: a readable prefix from the item's name, then the alert
    id, e.g. `df00204.jpg_3f2a...`. Derived from the verdict alone, so a redelivery
    finds the same folder; the prefix is only what a file name may hold (ASCII letters,
    digits, `._-`), so a hostile name cannot leave the bundle."""
    shown = redact_urls(verdict.source or verdict.url)
    path = shown.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    leaf = path.rsplit("/", 1)[-1]
    slug = _UNSAFE.sub("-", leaf).strip("-._")[:_SLUG_MAX].rstrip("-._")
    return f"{slug}_{alert_id}" if slug else alert_id


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_MAX = 48


def model_weights(verdict: Verdict, weights_id: Callable[[str], str]) -> dict[str, str]:
    """Signal name -> full weights sha256, for each model signal whose recorded version
    (`name@<sha256 prefix>`) is the weights `weights_id` names here; a signal scored by
    other weights (a canary, a rolling upgrade) keeps only its recorded prefix."""
    out: dict[str, str] = {}
    for sig in verdict.signals:
        name, _, prefix = sig.model.partition("@")
        if not prefix:
            continue
        try:
            full = weights_id(name)
        except Exception:  # a model this process does not know: its prefix stands
            continue
        if full.startswith(prefix):
            out[sig.name] = full
    return out


def write_bundle(
    store: ObjectStore,
    *,
    prefix: str,
    alert_id: str,
    verdict: Verdict,
    frames: Callable[[], Sequence[EvidenceFrame]],
    signer: Signer,
    weights: Mapping[str, str] | None = None,
    context: Callable[[], report_html.ReportContext] | None = None,
) -> Bundle:
    """Write the bundle (idempotent), signed by `signer`.

    `frames` returns decoded images near the driving times; it is called only when the
    bundle does not exist yet, so a redelivered verdict costs no download or decode.
    `weights`: signal name -> full weights sha256, recorded in the manifest.
    `context`: what report.json and report.html show beyond the verdict (the policy's
    thresholds, container facts, the decoded audio); called, like `frames`, only when
    the bundle is written.

    Order: the objects, then `manifest.json`, then `manifest.sig.json`, the commit
    point. A retry that finds the manifest but no signature signs the stored manifest
    (Ed25519 is deterministic, so two writers produce the same signature file).
    """
    base = (
        f"{prefix}/{bundle_name(verdict, alert_id)}" if prefix else bundle_name(verdict, alert_id)
    )
    manifest_key = f"{base}/manifest.json"
    signature_key = f"{base}/{SIGNATURE_NAME}"
    if store.exists(signature_key):
        return _existing(store, manifest_key)
    if store.exists(manifest_key):
        data = store.get_bytes(manifest_key)
        _sign(store, signer, prefix, signature_key, data)
        return Bundle(manifest_key, store.uri(manifest_key), sha256_bytes(data), created=False)
    decoded = frames()
    ctx = context() if context is not None else report_html.ReportContext()
    boxes = (
        {"review": ctx.policy.review_threshold, "flag": ctx.policy.flag_threshold}
        if ctx.policy is not None
        else {}
    )
    shown: dict[str, bytes] = {}  # the images report.html embeds, by object name
    objects: list[dict[str, object]] = []

    def put(name: str, data: bytes, content_type: str, role: str, **extra: object) -> str:
        digest = sha256_bytes(data)
        key = f"{base}/{digest[:16]}_{name}"
        store.put_if_absent(key, data, content_type=content_type, sha256=digest)
        objects.append(
            {"name": name, "key": key, "sha256": digest, "size": len(data), "role": role, **extra}
        )
        return digest

    frame_refs = []
    for n, fr in enumerate(driving_frames(verdict)):
        ev = closest(decoded, fr.time_s)
        if ev is None:
            continue
        name = f"frame_{n:02d}_{fr.time_s:08.3f}s.jpg"
        shown[name] = annotate(ev.image, fr, **boxes)
        digest = put(name, shown[name], "image/jpeg", "frame", time_s=fr.time_s)
        explained = []
        for ov in ev.overlays:
            ov_name = f"{name[:-4]}_{ov.name}.png"
            shown[ov_name] = ov.png
            ov_digest = put(
                ov_name, ov.png, "image/png", ov.role, time_s=fr.time_s, explains=name, note=ov.note
            )
            explained.append(
                {"name": ov_name, "sha256": ov_digest, "role": ov.role, "note": ov.note}
            )
        frame_refs.append(
            {
                "name": name,
                "sha256": digest,
                "time_s": fr.time_s,
                "score": fr.score,
                "explanations": explained,
            }
        )
    # The report's bytes (and so its key) must not change when the same media is
    # detected again after a crash, or a half-written bundle would gain a second
    # report: `detected_at` differs per detection, so the manifest's `created_at`
    # stands for the time instead.
    verdict_doc = {k: v for k, v in to_builtins(verdict).items() if k != "detected_at"}
    report = {
        "schema": REPORT_SCHEMA,
        "alert_id": alert_id,
        "tool": {"name": "synthwatch", "version": __version__},
        "verdict": {
            **verdict_doc,
            "url": redact_urls(verdict.url),
            "source": redact_urls(verdict.source),
        },
        "evidence_frames": frame_refs,
        "models": [
            {"signal": s.name, "model": s.model, "weights_sha256": (weights or {}).get(s.name)}
            for s in verdict.signals
        ],
        **ctx.document(),
    }
    put("report.json", _json(report), "application/json", "report")
    # The page for people, from the same document: it and report.json cannot disagree.
    put(
        "report.html",
        report_html.render_html(report, shown, audio=ctx.audio),
        "text/html; charset=utf-8",
        "report_html",
    )
    known = dict(weights or {})
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "alert_id": alert_id,
        "bundle": base.rsplit("/", 1)[-1],
        "media_sha256": verdict.sha256,
        "media_type": verdict.media_type,
        "source": redact_urls(verdict.source),
        "url": redact_urls(verdict.url),
        "decision": verdict.decision,
        "synthetic_score": verdict.synthetic_score,
        "model_set": verdict.model_set,
        "models": [
            {"signal": s.name, "model": s.model, "weights_sha256": known.get(s.name)}
            for s in verdict.signals
        ],
        "policy_version": verdict.policy_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "synthwatch", "version": __version__},
        "signing": {"algorithm": ALGORITHM, "key_id": signer.key_id},
        "objects": objects,
    }
    data = _json(manifest)
    digest = sha256_bytes(data)
    if not store.put_if_absent(manifest_key, data, content_type="application/json", sha256=digest):
        data = store.get_bytes(manifest_key)  # another writer's manifest stands: sign it
        digest = sha256_bytes(data)
    created = _sign(store, signer, prefix, signature_key, data)
    return Bundle(manifest_key, store.uri(manifest_key), digest, created=created)


def _sign(store: ObjectStore, signer: Signer, prefix: str, key: str, manifest: bytes) -> bool:
    """Write the manifest's signature (the bundle's commit point) and publish the public
    key as `<prefix>/keys/<key id>.pem`, beside the bundles. False when a signature
    was already there."""
    pub_key = f"{prefix}/keys/{signer.key_id}.pem" if prefix else f"keys/{signer.key_id}.pem"
    store.put_if_absent(pub_key, signer.public_pem.encode(), content_type="application/x-pem-file")
    doc = signature_document(signer.sign(manifest), sha256_bytes(manifest))
    return store.put_if_absent(key, _json(doc), content_type="application/json")


def _existing(store: ObjectStore, manifest_key: str) -> Bundle:
    data = store.get_bytes(manifest_key)
    return Bundle(manifest_key, store.uri(manifest_key), sha256_bytes(data), created=False)


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


# --- verification ----------------------------------------------------------------------

BAD_SIGNATURE = 4
"""`verify` exit-code bit: the signature does not match (manifest or signature altered)."""
NOT_TRUSTED = 8
"""Bit: unsigned, or signed by a key the verifier does not hold."""
ALTERED = 16
"""Bit: an object listed in the manifest does not match its sha256 or size."""
MISSING = 32
"""Bit: an object listed in the manifest is not there."""
ADDED = 64
"""Bit: the bundle folder holds an object the manifest does not list."""


@dataclass
class BundleCheck:
    """What `verify_bundle` found: empty lists and `signature == "valid"` when intact."""

    folder: str
    signature: Literal["valid", "invalid", "unsigned", "untrusted"] = "unsigned"
    key_id: str | None = None
    problems: list[str] = field(default_factory=list)
    """One line per problem, each naming the object."""
    altered: list[str] = field(default_factory=list)
    """File names; `manifest.json` or `manifest.sig.json` here sets `BAD_SIGNATURE`."""
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    objects: int = 0

    @property
    def exit_code(self) -> int:
        code = 0
        if self.signature == "invalid":
            code |= BAD_SIGNATURE
        if self.signature in ("unsigned", "untrusted"):
            code |= NOT_TRUSTED
        if set(self.altered) - {"manifest.json", SIGNATURE_NAME}:
            code |= ALTERED
        if self.missing:
            code |= MISSING
        if self.added:
            code |= ADDED
        return code


def verify_bundle(
    store: ObjectStore, folder: str, trusted: Mapping[str, Ed25519PublicKey]
) -> BundleCheck:
    """Check a bundle folder (`<prefix>/<bundle>` in `store`): the manifest's signature
    against the keys in `trusted` (key id -> public key), then every object it lists by
    sha256 and size, then that nothing else was put in the folder. Objects are found by
    their file name inside the folder, so a bundle copied or moved elsewhere still
    verifies."""
    folder = folder.rstrip("/")
    check = BundleCheck(folder=folder)
    manifest_key, signature_key = f"{folder}/manifest.json", f"{folder}/{SIGNATURE_NAME}"
    try:
        manifest_bytes = store.get_bytes(manifest_key)
    except Exception:
        raise InvalidRef(f"{store.uri(folder)}: no manifest.json: not an evidence bundle") from None
    present = set(store.list_keys(folder))
    _check_signature(store, check, signature_key, present, manifest_bytes, trusted)
    try:
        manifest = json.loads(manifest_bytes)
        listed = [(str(o["key"]), str(o["sha256"]), int(o["size"])) for o in manifest["objects"]]
    except (ValueError, KeyError, TypeError) as exc:
        if "manifest.json" not in check.altered:
            check.altered.append("manifest.json")
            check.problems.append(f"manifest.json: altered: its object list cannot be read ({exc})")
        return check
    expected = {manifest_key, signature_key}
    for key, sha, size in listed:
        name = key.rsplit("/", 1)[-1]
        here = f"{folder}/{name}"
        expected.add(here)
        check.objects += 1
        if here not in present:
            check.missing.append(name)
            check.problems.append(f"{name}: missing")
            continue
        data = store.get_bytes(here)
        if len(data) != size or sha256_bytes(data) != sha:
            check.altered.append(name)
            check.problems.append(
                f"{name}: altered (sha256 {sha256_bytes(data)[:16]}…, size {len(data)}; "
                f"the manifest says {sha[:16]}…, size {size})"
            )
    for key in sorted(present - expected):
        name = key[len(folder) + 1 :]
        check.added.append(name)
        check.problems.append(f"{name}: added (not listed in the manifest)")
    return check


def _check_signature(
    store: ObjectStore,
    check: BundleCheck,
    signature_key: str,
    present: set[str],
    manifest: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
) -> None:
    if signature_key not in present:
        check.signature = "unsigned"
        check.problems.append(f"{SIGNATURE_NAME}: missing: the bundle is not signed")
        return
    try:
        doc = json.loads(store.get_bytes(signature_key))
        kid, sig_b64, recorded = str(doc["key_id"]), str(doc["signature"]), doc["manifest_sha256"]
        embedded = load_public(str(doc["public_key"]), SIGNATURE_NAME)
    except (ValueError, KeyError, TypeError, ConfigError):
        check.signature = "invalid"
        check.altered.append(SIGNATURE_NAME)
        check.problems.append(f"{SIGNATURE_NAME}: altered: it cannot be read as a signature")
        return
    check.key_id = kid
    if recorded != sha256_bytes(manifest):
        check.signature = "invalid"
        check.altered.append("manifest.json")
        check.problems.append("manifest.json: altered: it is not the manifest that was signed")
        return
    public = trusted.get(kid)
    if public is None:
        if key_id(embedded) == kid and check_signature(embedded, sig_b64, manifest):
            check.signature = "untrusted"
            check.problems.append(
                f"{SIGNATURE_NAME}: signed by key {kid}, which is not a key you trust "
                "(add its public key with --key or to signing.trusted_keys_dir)"
            )
            return
        public = embedded
    if not check_signature(public, sig_b64, manifest):
        check.signature = "invalid"
        check.altered.append(SIGNATURE_NAME)
        check.problems.append(
            f"{SIGNATURE_NAME}: altered: its signature does not verify with key {kid}"
        )
        return
    check.signature = "valid"
    try:
        signed_kid = json.loads(manifest).get("signing", {}).get("key_id")
    except ValueError:
        signed_kid = None
    if signed_kid is not None and signed_kid != kid:
        check.signature = "invalid"
        check.problems.append(
            f"manifest.json: records key {signed_kid} but was signed with key {kid}"
        )
