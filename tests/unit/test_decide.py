"""Fusion, policy, alert ids and evidence bundles: what a reviewer of a finding sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synthwatch.errors import InvalidRef
from synthwatch.operators.alert import alert_id, make_alert
from synthwatch.operators.evidence import Bundle, EvidenceFrame, verify_bundle, write_bundle
from synthwatch.operators.fuse import aggregate_scores
from synthwatch.operators.policy import Policy
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalStore, blob_key, check_key
from synthwatch.schemas import FaceBox, FrameResult, Verdict


def frame(i: int, t: float, score: float) -> FrameResult:
    box = FaceBox(x0=10, y0=10, x1=60, y1=70, confidence=0.99, score=score)
    return FrameResult(index=i, time_s=t, score=score, region="faces", faces=[box])


def verdict(score: float = 0.9, frames: list[FrameResult] | None = None) -> Verdict:
    frames = frames if frames is not None else [frame(0, 0.5, 0.2), frame(1, 1.5, 0.95)]
    return Verdict(
        id="m1",
        url="https://example.org/v.mp4",
        sha256="ab" * 32,
        media_type="video",
        synthetic_score=score,
        decision="flag",
        signals=[],
        segments=[],
        frames=frames,
        duration_s=2.0,
        faces_found=2,
        has_audio=False,
        model_set="ms1",
        policy_version="policy.v1",
        blob="blobs/x",
    )


def test_top_k_mean_is_driven_by_the_manipulated_stretch() -> None:
    # 8 frames, a swap in frames 5-6: a plain mean would dilute it to ~0.3.
    scores = [0.05, 0.1, 0.05, 0.1, 0.05, 0.95, 0.9, 0.1]
    frames = [frame(i, i * 1.0 + 0.5, s) for i, s in enumerate(scores)]
    score, segments = aggregate_scores(
        [f.time_s for f in frames], [f.score for f in frames], duration_s=8.0
    )
    assert score == pytest.approx((0.95 + 0.9) / 2)
    assert len(segments) == 1
    assert segments[0].start_s == pytest.approx(5.0)
    assert segments[0].end_s == pytest.approx(7.0)
    assert segments[0].score == pytest.approx(0.95)


def test_separate_stretches_give_separate_segments() -> None:
    scores = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.8]
    frames = [frame(i, float(i), s) for i, s in enumerate(scores)]
    _, segments = aggregate_scores(
        [f.time_s for f in frames], [f.score for f in frames], duration_s=8.0
    )
    assert [(s.start_s, s.score) for s in segments] == [(0.0, 0.9), (6.5, 0.8)]


def test_no_frames_scores_zero_without_segments() -> None:
    assert aggregate_scores([], [], duration_s=3.0) == (0.0, [])


def test_policy_thresholds() -> None:
    p = Policy(version="p1", flag_threshold=0.8, review_threshold=0.5)
    assert [p.decide(s) for s in (0.1, 0.5, 0.79, 0.8, 1.0)] == [
        "pass",
        "review",
        "review",
        "flag",
        "flag",
    ]
    assert p.alerts("flag") and p.alerts("review") and not p.alerts("pass")
    with pytest.raises(ValueError, match="thresholds"):
        Policy(version="bad", flag_threshold=0.4, review_threshold=0.6)


def test_alert_id_is_deterministic_and_changes_with_policy_or_models() -> None:
    a = alert_id("ab" * 32, "ms1", "policy.v1")
    assert a == alert_id("ab" * 32, "ms1", "policy.v1")
    assert a != alert_id("ab" * 32, "ms1", "policy.v2")
    assert a != alert_id("ab" * 32, "ms2", "policy.v1")
    alert = make_alert(verdict(), evidence_uri="s3://b/k", manifest_sha256="00")
    assert alert.alert_id == alert_id("ab" * 32, "ms1", "policy.v1")


SIGNER = Signer.generate()


def _folder(bundle: Bundle) -> str:
    return bundle.manifest_key.rsplit("/", 1)[0]


def _frames() -> list[EvidenceFrame]:
    rng = np.random.default_rng(0)
    return [
        EvidenceFrame(time_s=t, image=rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
        for t in (0.5, 1.5)
    ]


def test_evidence_bundle_manifest_hashes_match_and_a_retry_overwrites_nothing(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    v = verdict()
    first = write_bundle(
        store, prefix="evidence", alert_id="a1", verdict=v, frames=_frames, signer=SIGNER
    )
    assert first.created
    manifest = json.loads(store.get_bytes(first.manifest_key))
    roles = sorted(o["role"] for o in manifest["objects"])
    assert roles == ["frame", "frame", "report", "report_html"]
    check = verify_bundle(store, _folder(first), {SIGNER.key_id: SIGNER.public})
    assert check.exit_code == 0 and check.problems == []
    stored = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def must_not_decode() -> list[EvidenceFrame]:
        raise AssertionError("a redelivered verdict re-decoded its frames")

    again = write_bundle(
        store, prefix="evidence", alert_id="a1", verdict=v, frames=must_not_decode, signer=SIGNER
    )
    assert not again.created
    assert again.manifest_sha256 == first.manifest_sha256
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == stored


def test_tampered_evidence_is_detected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    b = write_bundle(
        store, prefix="evidence", alert_id="a2", verdict=verdict(), frames=_frames, signer=SIGNER
    )
    report = next(tmp_path.rglob("*_report.json"))
    report.write_bytes(report.read_bytes().replace(b"0.95", b"0.05"))
    check = verify_bundle(store, _folder(b), {SIGNER.key_id: SIGNER.public})
    assert check.altered == [report.name] and check.signature == "valid"


def test_local_store_is_write_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.put_if_absent("a/b.json", b"one", content_type="application/json")
    assert not store.put_if_absent("a/b.json", b"two", content_type="application/json")
    assert store.get_bytes("a/b.json") == b"one"


def test_local_store_refuses_a_file_that_does_not_match_its_sha256(tmp_path: Path) -> None:
    import hashlib

    from synthwatch.errors import StorageFailed

    store = LocalStore(tmp_path / "store")
    media = tmp_path / "clip.bin"
    media.write_bytes(b"media bytes")
    with pytest.raises(StorageFailed, match="not match sha256"):
        store.put_file_if_absent(
            "blobs/x", media, content_type="video/mp4", sha256=hashlib.sha256(b"x").hexdigest()
        )
    assert not (tmp_path / "store" / "blobs" / "x").exists()
    digest = hashlib.sha256(b"media bytes").hexdigest()
    assert store.put_file_if_absent("blobs/x", media, content_type="video/mp4", sha256=digest)
    assert store.get_bytes("blobs/x") == b"media bytes"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a\x00b", "é/x", ""])
def test_keys_cannot_escape_or_be_shaped_by_input(key: str) -> None:
    with pytest.raises(InvalidRef):
        check_key(key)


def test_blob_keys_fan_out_by_hash() -> None:
    sha = "0123456789abcdef" * 4
    assert blob_key("blobs/sha256", sha) == f"blobs/sha256/01/23/{sha}"
    with pytest.raises(InvalidRef):
        blob_key("blobs/sha256", "../../etc")
