"""Write a forensic evidence bundle for a decided verdict: frames, report, manifest.

Layout under `<prefix>/<alert_id>/` (or `<alert_id>/` with an empty prefix):

- `<sha256[:16]>_frame_<n>_<t>s.jpg`: the frames that drove the score, face boxes drawn
  with each crop's score;
- `<sha256[:16]>_frame_<n>_<t>s_<what>.png`: beside each frame, the images that explain
  it: a heatmap (RISE or occlusion) per flagged face or whole frame, forensic maps (error level,
  residual spectrum) for images;
- `<sha256[:16]>_report.json`: the verdict with its per-frame timeline and the tool version
  (its `url` and `source` redacted as in the alert: no credentials, no URL signatures);
- `manifest.json`: every object's key, sha256 and size, the media sha256 and the alert id.

Object keys carry their own content hash and the bundle lives under the deterministic
alert id, so keys derive from hashes only. Every write is write-once, and the manifest
is written last: it is the commit point. A retry after a crash re-writes missing
objects (same keys when the content is the same; new keys and harmless orphans when it
differs) and, if the manifest already exists, keeps the stored one and returns its hash.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from synthwatch import __version__
from synthwatch.operators.redact import redact_urls
from synthwatch.operators.store import ObjectStore, sha256_bytes
from synthwatch.schemas import FrameResult, Verdict, to_builtins

MAX_EVIDENCE_FRAMES = 8
MANIFEST_SCHEMA = "synthwatch.evidence_manifest.v1"
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


def annotate(image: npt.NDArray[np.uint8], frame: FrameResult) -> bytes:
    """JPEG of the frame with each face box and its score drawn."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    width = max(2, round(max(pil.size) / 400))
    for face in frame.faces:
        colour = (230, 30, 30) if face.score >= 0.5 else (30, 200, 60)
        draw.rectangle((face.x0, face.y0, face.x1, face.y1), outline=colour, width=width)
        draw.text((face.x0 + width, max(0.0, face.y0 - 12)), f"{face.score:.2f}", fill=colour)
    draw.text((8, 8), f"t={frame.time_s:.2f}s score={frame.score:.3f}", fill=(255, 255, 0))
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=92)
    return out.getvalue()


SAME_FRAME_S = 0.5
"""A decoded frame this close to a timeline entry's time is taken to be that frame."""


def closest(frames: Sequence[EvidenceFrame], t: float) -> EvidenceFrame | None:
    """The frame shown at `t`: the nearest one within `SAME_FRAME_S`, else None."""
    best = min(frames, key=lambda f: abs(f.time_s - t), default=None)
    return best if best is not None and abs(best.time_s - t) < SAME_FRAME_S else None


def write_bundle(
    store: ObjectStore,
    *,
    prefix: str,
    alert_id: str,
    verdict: Verdict,
    frames: Callable[[], Sequence[EvidenceFrame]],
) -> Bundle:
    """Write the bundle (idempotent).

    `frames` returns decoded images near the driving times; it is called only when the
    bundle does not exist yet, so a redelivered verdict costs no download or decode.
    """
    base = f"{prefix}/{alert_id}" if prefix else alert_id
    manifest_key = f"{base}/manifest.json"
    if store.exists(manifest_key):
        return _existing(store, manifest_key)
    decoded = frames()
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
        digest = put(name, annotate(ev.image, fr), "image/jpeg", "frame", time_s=fr.time_s)
        explained = []
        for ov in ev.overlays:
            ov_name = f"{name[:-4]}_{ov.name}.png"
            ov_digest = put(
                ov_name, ov.png, "image/png", ov.role, time_s=fr.time_s, explains=name, note=ov.note
            )
            explained.append({"name": ov_name, "sha256": ov_digest, "role": ov.role})
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
    }
    put("report.json", _json(report), "application/json", "report")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "alert_id": alert_id,
        "media_sha256": verdict.sha256,
        "model_set": verdict.model_set,
        "policy_version": verdict.policy_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": {"name": "synthwatch", "version": __version__},
        "objects": objects,
    }
    data = _json(manifest)
    digest = sha256_bytes(data)
    if not store.put_if_absent(manifest_key, data, content_type="application/json", sha256=digest):
        return _existing(store, manifest_key)  # another writer finished first: theirs stands
    return Bundle(manifest_key, store.uri(manifest_key), digest, created=True)


def _existing(store: ObjectStore, manifest_key: str) -> Bundle:
    data = store.get_bytes(manifest_key)
    return Bundle(manifest_key, store.uri(manifest_key), sha256_bytes(data), created=False)


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def verify_bundle(store: ObjectStore, manifest_key: str) -> list[str]:
    """Problems found re-hashing every object the manifest lists; empty when intact."""
    manifest = json.loads(store.get_bytes(manifest_key))
    problems = []
    for obj in manifest["objects"]:
        try:
            data = store.get_bytes(obj["key"])
        except Exception as exc:  # reported, not raised: the caller wants the full list
            problems.append(f"{obj['key']}: unreadable ({type(exc).__name__})")
            continue
        if sha256_bytes(data) != obj["sha256"]:
            problems.append(f"{obj['key']}: sha256 mismatch")
    return problems
