"""report.html: the page an editor or a court reads. It must render offline, show one
number per face and per frame in every view, say honestly what a decision means, and
never run what an uploader put in a file name."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthwatch.operators import heatmap, report
from synthwatch.operators.calibrate import Calibration, Calibrator
from synthwatch.operators.evidence import EvidenceFrame, Overlay, annotate, write_bundle
from synthwatch.operators.fuse import calibrate
from synthwatch.operators.policy import Policy
from synthwatch.operators.report import AudioTrack, ReportContext, render_html, score_text
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalStore
from synthwatch.schemas import (
    Decision,
    FaceBox,
    FrameResult,
    MediaType,
    Provenance,
    Segment,
    Signal,
    Verdict,
    to_builtins,
)

POLICY = Policy(version="policy.test7", flag_threshold=0.8, review_threshold=0.5)
SIGNER = Signer.generate()
FACE_SCORE = 0.781234


class Page(HTMLParser):
    """What a browser would fetch or run: every src/href, scripts, styles, and the text
    of the cells marked as face scores, and each element's text by id."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []
        self.styles: list[str] = []
        self.face_cells: list[str] = []
        self.text = ""
        self._in_style = False
        self._face_cell = False
        self._stack: list[str] = []
        self.images: dict[str, list[str]] = {}
        """Section id -> image sources in it."""
        self._section = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        for name in ("src", "href", "action", "poster", "data", "srcset"):
            if a.get(name) is not None:
                self.links.append(str(a[name]))
        if tag == "h2" and a.get("id"):
            self._section = str(a["id"])
        if tag == "img":
            self.images.setdefault(self._section, []).append(str(a.get("src")))
        self._in_style = tag == "style"
        self._face_cell = "face-score" in (a.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False
        self._face_cell = False

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._in_style:
            self.styles.append(data)
        if self._face_cell:
            self.face_cells.append(data.strip())


def parse(html: bytes) -> Page:
    page = Page()
    page.feed(html.decode("utf-8"))
    return page


def face_frame(i: int, t: float, score: float) -> FrameResult:
    box = FaceBox(x0=20, y0=15, x1=70, y1=75, confidence=0.99, score=score, face=0)
    return FrameResult(index=i, time_s=t, score=score, region="faces", faces=[box])


def make_verdict(
    *,
    decision: Decision = "review",
    score: float | None = FACE_SCORE,
    media_type: MediaType = "video",
    signals: list[Signal] | None = None,
    frames: list[FrameResult] | None = None,
    source: str = "feeds/clip.mp4",
    notes: list[str] | None = None,
) -> Verdict:
    sig = Signal(
        name="sbi_face",
        model="sbi_face@3ff03b08d96c",
        score=0.70,
        raw_score=0.93,
        calibrated=True,
        weight=1.0,
        modality="face",
        segments=[Segment(start_s=1.0, end_s=2.0, score=FACE_SCORE, raw_score=0.98)],
    )
    signals = [sig] if signals is None else signals
    frames = (
        [face_frame(0, 0.5, 0.2), face_frame(1, 1.5, FACE_SCORE), face_frame(2, 2.5, 0.31)]
        if frames is None
        else frames
    )
    return Verdict(
        id="m1",
        url="https://example.org/clip.mp4?X-Amz-Signature=REDACTED",
        source=source,
        sha256="cd" * 32,
        media_type=media_type,
        synthetic_score=score,
        decision=decision,
        signals=signals,
        segments=list(signals[0].segments) if signals else [],
        frames=frames,
        duration_s=3.0,
        faces_found=1,
        has_audio=media_type == "audio",
        model_set="ms1",
        policy_version=POLICY.version,
        blob="blobs/x",
        notes=notes or [],
        decided_by=[signals[0].name] if signals and score is not None else [],
        provenance=Provenance(present=False),
    )


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (90, 110, 3), dtype=np.uint8)


def doc_for(verdict: Verdict, *, policy: Policy | None = POLICY) -> dict[str, object]:
    """A report document as write_bundle makes it, with one evidence frame and heatmap."""
    frame = verdict.frames[1] if len(verdict.frames) > 1 else None
    evidence = []
    if frame is not None:
        evidence.append(
            {
                "name": "frame_00_0001.500s.jpg",
                "sha256": "ef" * 32,
                "time_s": frame.time_s,
                "score": frame.score,
                "explanations": [
                    {
                        "name": "frame_00_0001.500s_heatmap_face0.png",
                        "sha256": "01" * 32,
                        "role": "heatmap",
                        "note": "occlusion map of sbi_face@3ff03b08d96c on face 0",
                    }
                ],
            }
        )
    doc: dict[str, object] = {
        "schema": "synthwatch.report.v1",
        "alert_id": "0" * 32,
        "tool": {"name": "synthwatch", "version": "9.9"},
        "verdict": to_builtins(verdict),
        "evidence_frames": evidence,
        "models": [
            {
                "signal": "sbi_face",
                "model": "sbi_face@3ff03b08d96c",
                "weights_sha256": "3ff03b08d96c" + "a" * 52,
            }
        ],
    }
    if policy is not None:
        doc["policy"] = report.policy_facts(policy)
    return doc


def images_for(verdict: Verdict) -> dict[str, bytes]:
    heat = np.zeros((90, 110), dtype=np.float32)
    heat[20:40, 30:60] = 1.0
    return {
        "frame_00_0001.500s.jpg": annotate(picture(), verdict.frames[1]),
        "frame_00_0001.500s_heatmap_face0.png": heatmap.png(heatmap.overlay(picture(1), heat)),
    }


def audio_verdict() -> Verdict:
    sig = Signal(
        name="aasist",
        model="aasist@51d2d9cf0738",
        score=0.93,
        raw_score=0.97,
        calibrated=True,
        weight=1.0,
        modality="audio",
        segments=[Segment(start_s=4.0, end_s=8.0, score=0.95, raw_score=0.99)],
    )
    return make_verdict(decision="flag", score=0.93, media_type="audio", signals=[sig], frames=[])


def test_the_page_loads_nothing_from_outside_itself() -> None:
    v = make_verdict()
    html = render_html(doc_for(v), images_for(v))
    page = parse(html)
    assert page.links, "the frames and plots are embedded"
    for link in page.links:
        assert link.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), link
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert not any(re.search(r"url\(|@import|@font-face", css) for css in page.styles)
    assert b"default-src 'none'" in html  # and the browser is told to fetch nothing


def test_the_page_names_the_item_hash_decision_policy_and_every_detector() -> None:
    v = make_verdict()
    page = parse(render_html(doc_for(v), images_for(v)))
    assert "clip.mp4" in page.text
    assert v.sha256 in page.text
    assert "review" in page.text.lower()
    assert POLICY.version in page.text
    assert "sbi_face@3ff03b08d96c" in page.text
    assert "3ff03b08d96c" + "a" * 52 in page.text  # the full weights hash
    assert "review 0.500, flag 0.800" in page.text  # the threshold applied
    assert "X-Amz-Signature=REDACTED" in page.text  # shown as the verdict has it


def test_a_face_reads_the_same_number_on_the_frame_in_the_tables_and_in_the_json() -> None:
    v = make_verdict()
    doc = doc_for(v)
    page = parse(render_html(doc, images_for(v)))
    shown = score_text(FACE_SCORE)
    assert shown == "0.781"
    # The evidence frame's face table and the every-frame table show it the same way...
    assert page.face_cells.count(shown) == 2
    # ... so does the segment that frame drove, and the frame's title.
    assert f"frame score {shown}" in page.text
    assert "Highest sbi_face score in the stretch" in page.text
    # ... and report.json, from which the page was made.
    evidence = doc["evidence_frames"]
    assert isinstance(evidence, list)
    assert score_text(evidence[0]["score"]) == shown
    face = json.loads(json.dumps(doc))["verdict"]["frames"][1]["faces"][0]
    assert score_text(face["score"]) == shown


def test_calibrated_segments_read_the_number_of_the_frame_behind_them() -> None:
    # The bug users saw: the frame label said 0.78 (calibrated), the segment 0.98 (raw).
    cal = Calibrator(
        signal="sbi_face", model="sbi_face@3ff03b08d96c", method="platt", a=0.6, b=-0.4
    )
    raw = Signal(
        name="sbi_face",
        model="sbi_face@3ff03b08d96c",
        score=0.93,
        weight=1.0,
        segments=[Segment(start_s=1.0, end_s=2.0, score=0.98)],
    )
    calibration = Calibration(calibrators=[cal])
    once = calibrate([raw], calibration)
    frame_label = round(cal.apply(0.98), 6)  # what score.fused_crop gives the face
    assert once[0].segments[0].score == frame_label != 0.98
    assert once[0].segments[0].raw_score == 0.98
    # Calibrating again (eval re-scores verdicts per fold) starts from the raw scores.
    assert calibrate(once, calibration) == once


def test_an_inconclusive_item_is_explained_as_nothing_measured_not_as_a_pass() -> None:
    v = make_verdict(
        decision="inconclusive",
        score=None,
        signals=[],
        frames=[],
        notes=["no face found: the face models did not score this item"],
    )
    page = parse(render_html(doc_for(v), {}))
    assert "Inconclusive: no detector that applies to this item produced a score" in page.text
    assert "Inconclusive is not a pass" in page.text
    assert "no face found" in page.text
    assert "Passed" not in page.text


@pytest.mark.parametrize(
    ("decision", "score", "expected"),
    [
        ("flag", 0.93, "This is a statistical finding, not proof"),
        ("review", 0.6, "nor that it is authentic"),
        ("pass", 0.1, "This is not proof that the item is authentic"),
    ],
)
def test_each_decision_says_what_it_means_and_its_limits(
    decision: Decision, score: float, expected: str
) -> None:
    v = make_verdict(decision=decision, score=score)
    page = parse(render_html(doc_for(v), images_for(v)))
    assert expected in page.text
    assert "Limits: each detector is a model trained on examples" in page.text


def test_an_audio_report_shows_the_waveform_with_the_windows_that_drove_the_score() -> None:
    v = audio_verdict()
    t = np.arange(16000 * 12, dtype=np.float32) / 16000
    track = AudioTrack((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    page = parse(render_html(doc_for(v), {}, audio=track))
    plots = page.images.get("audio", [])
    assert len(plots) == 1 and plots[0].startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(plots[0].split(",", 1)[1])))
    assert image.width >= 800 and image.height >= 300
    assert "4.00 s" in page.text and "8.00 s" in page.text and "0.950" in page.text
    # Without the decoded audio the windows are still listed, and the page says why.
    bare = parse(render_html(doc_for(v), {}))
    assert "audio" not in bare.images and "0.950" in bare.text
    assert "decoded audio is not in this bundle" in bare.text


def test_a_hostile_file_name_is_shown_as_text_never_run() -> None:
    v = make_verdict(
        source="<script>alert(1)</script>.jpg", notes=['"><img src=x onerror=alert(2)>']
    )
    html = render_html(doc_for(v), images_for(v))
    page = parse(html)
    assert "script" not in page.tags
    assert all(link.startswith(("data:", "#")) for link in page.links)
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    assert "<script>alert(1)</script>.jpg" in page.text  # readable as the name it is


def test_the_same_bundle_renders_the_same_bytes() -> None:
    # The report is stored under its own hash: a retried bundle must find the same key.
    v = make_verdict()
    assert render_html(doc_for(v), images_for(v)) == render_html(doc_for(v), images_for(v))


def test_a_score_just_under_one_is_not_shown_as_certain() -> None:
    assert score_text(0.999995) == "> 0.999"
    assert score_text(1.0) == "1.000"
    assert score_text(0.0000004) == "< 0.001"
    assert score_text(None) == "none"


def test_the_frame_caption_sits_under_the_picture_so_boxes_keep_their_coordinates() -> None:
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    frame = FrameResult(index=0, time_s=8.5, score=0.781, region="frame")
    out = Image.open(io.BytesIO(annotate(image, frame)))
    assert out.width == 300 and out.height > 200
    top = np.asarray(out.convert("RGB"))[:200].astype(int)
    assert np.abs(top - 128).max() <= 4  # the picture itself is untouched (JPEG noise)


def test_the_bundle_holds_a_report_page_made_from_its_report_json(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    v = make_verdict()
    heat = np.ones((90, 110), dtype=np.float32)
    overlay = Overlay(
        name="heatmap_face0",
        role="heatmap",
        png=heatmap.png(heatmap.overlay(picture(1), heat)),
        note="occlusion map of sbi_face@3ff03b08d96c on face 0",
    )

    def frames() -> list[EvidenceFrame]:
        return [
            EvidenceFrame(time_s=f.time_s, image=picture(), overlays=(overlay,)) for f in v.frames
        ]

    bundle = write_bundle(
        store,
        prefix="evidence",
        alert_id="b" * 32,
        verdict=v,
        frames=frames,
        signer=SIGNER,
        context=lambda: ReportContext(policy=POLICY, media={"container": "mov,mp4", "width": 110}),
    )
    manifest = json.loads(store.get_bytes(bundle.manifest_key))
    pages = [o for o in manifest["objects"] if o["role"] == "report_html"]
    assert len(pages) == 1 and pages[0]["name"] == "report.html"
    data = store.get_bytes(pages[0]["key"])
    doc = json.loads(next(tmp_path.rglob("*_report.json")).read_bytes())
    assert doc["policy"]["review_threshold"] == 0.5 and doc["media"]["container"] == "mov,mp4"
    assert doc["evidence_frames"][0]["explanations"][0]["note"].startswith("occlusion map")
    page = parse(data)
    assert "mov,mp4" in page.text and "occlusion map of sbi_face" in page.text
    assert all(link.startswith(("data:", "#")) for link in page.links)
    frame_images = [src for src in page.images.get("evidence", []) if "jpeg" in src]
    assert len(frame_images) == len(doc["evidence_frames"]) == 3


def test_a_known_fake_says_what_matched_and_what_a_match_means() -> None:
    from msgspec.structs import replace

    from synthwatch.operators.matching import match_signals
    from synthwatch.schemas import HashMatch

    match = HashMatch(
        list="afp",
        entry="case-2291",
        label="fake",
        algorithm="vpdq",
        distance=18,
        threshold=31,
        reference="https://factcheck.example/case-2291",
        source="AFP Fact Check",
        time_s=2.0,
        entry_match_percent=90.0,
        item_match_percent=45.0,
    )
    signals, _ = match_signals([match])
    v = replace(
        make_verdict(decision="flag"),
        signals=[*signals, *make_verdict().signals],
        matches=[match],
        decided_by=["match"],
    )
    page = parse(render_html(doc_for(v), images_for(v)))
    assert "Flagged: this item matches an entry of a list of known fakes" in page.text
    assert "entry 'case-2291' of list 'afp', listed by AFP Fact Check" in page.text
    assert "90% of its frames found in this video" in page.text
    assert "https://factcheck.example/case-2291" in page.text
    assert "This is a statistical finding" not in page.text
