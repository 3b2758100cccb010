"""Signed evidence bundles as a reader checks them: `synthwatch verify` and `keys show`.

Every case is what someone holding a bundle would do or meet: verify a fresh one, flip
one bit of one object, delete one, slip one in, receive one signed by a key they do not
hold, keep verifying old bundles after the signing key was rotated."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from synthwatch.operators.evidence import (
    ADDED,
    ALTERED,
    BAD_SIGNATURE,
    MISSING,
    NOT_TRUSTED,
    EvidenceFrame,
    Overlay,
    bundle_name,
    verify_bundle,
    write_bundle,
)
from synthwatch.operators.signing import Signer, SigningSettings, private_pem, trusted_keys
from synthwatch.operators.store import LocalStore
from synthwatch.pipeline.cli import app
from synthwatch.schemas import FaceBox, FrameResult, Signal, Verdict

runner = CliRunner()


def _verdict(source: str = "/media/clips/interview.mp4") -> Verdict:
    box = FaceBox(x0=10, y0=10, x1=60, y1=70, confidence=0.99, score=0.93)
    frames = [
        FrameResult(index=0, time_s=0.5, score=0.2, region="faces", faces=[box]),
        FrameResult(index=1, time_s=1.5, score=0.93, region="faces", faces=[box]),
    ]
    return Verdict(
        id="m1",
        url=source,
        source=source,
        sha256="ab" * 32,
        media_type="video",
        synthetic_score=0.93,
        decision="flag",
        signals=[Signal(name="sbi_face", model="sbi_face@0123456789ab", score=0.93, weight=1.0)],
        segments=[],
        frames=frames,
        duration_s=2.0,
        faces_found=1,
        has_audio=False,
        model_set="ms1",
        policy_version="policy.v1",
        blob="blobs/sha256/ab",
    )


def _frames() -> list[EvidenceFrame]:
    rng = np.random.default_rng(0)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    return [
        EvidenceFrame(
            time_s=t,
            image=rng.integers(0, 255, (80, 100, 3), dtype=np.uint8),
            overlays=(Overlay(name="heatmap_face0", role="heatmap", png=png),),
        )
        for t in (0.5, 1.5)
    ]


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The signing key the CLI reads (signing.key_file), and the one bundles are signed with."""
    path = tmp_path / "keys" / "current.pem"
    path.parent.mkdir()
    path.write_bytes(private_pem(Signer.generate()._key))
    monkeypatch.setenv("SYNTHWATCH_SIGNING__KEY_FILE", str(path))
    return path


@pytest.fixture
def bundle(tmp_path: Path, key_file: Path) -> Iterator[Path]:
    signer = Signer.from_settings(SigningSettings(key_file=key_file))
    store = LocalStore(tmp_path / "evidence")
    written = write_bundle(
        store, prefix="", alert_id="ab" * 16, verdict=_verdict(), frames=_frames, signer=signer
    )
    yield tmp_path / "evidence" / written.manifest_key.rsplit("/", 1)[0]


def _verify(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["verify", *args])
    return res.exit_code, res.output


def _flip_one_bit(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_fresh_bundle_verifies(bundle: Path) -> None:
    code, output = _verify(str(bundle))
    assert code == 0, output
    assert "verified" in output and "6 object(s) intact" in output
    # The manifest records what a court would ask: media, source, tools, models, key.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["media_sha256"] == "ab" * 32
    assert manifest["source"] == "/media/clips/interview.mp4"
    assert manifest["tool"]["name"] == "synthwatch" and manifest["policy_version"] == "policy.v1"
    assert manifest["models"] == [
        {"signal": "sbi_face", "model": "sbi_face@0123456789ab", "weights_sha256": None}
    ]
    assert all(o["size"] > 0 and len(o["sha256"]) == 64 for o in manifest["objects"])
    sig = json.loads((bundle / "manifest.sig.json").read_text())
    assert sig["algorithm"] == "Ed25519" and sig["key_id"] == manifest["signing"]["key_id"]
    # The public key is published beside the bundles.
    assert (bundle.parent / "keys" / f"{sig['key_id']}.pem").read_text() == sig["public_key"]


def test_the_folder_name_says_which_item_it_is() -> None:
    aid = "cd" * 16
    assert bundle_name(_verdict("/media/clips/interview.mp4"), aid) == f"interview.mp4_{aid}"
    url = "https://u:pw@cdn.example.org/a/Breaking%20News!.mp4?X-Amz-Signature=s3cr3t#t=1"
    assert bundle_name(_verdict(url), aid) == f"Breaking-20News-.mp4_{aid}"
    for hostile in ("../../etc/passwd", "/", "..", "https://x.org/", "\x00\n"):
        name = bundle_name(_verdict(hostile), aid)
        assert name.endswith(aid) and "/" not in name and not name.startswith(".")


@pytest.mark.parametrize("role", ["frame", "heatmap", "report"])
def test_one_flipped_bit_in_any_object_is_found_and_named(bundle: Path, role: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    obj = next(o for o in manifest["objects"] if o["role"] == role)
    victim = bundle / obj["key"].rsplit("/", 1)[-1]
    _flip_one_bit(victim)
    code, output = _verify(str(bundle))
    assert code == ALTERED, output
    assert f"{victim.name}: altered" in output
    others = [o for o in manifest["objects"] if o["key"] != obj["key"]]
    assert not any(o["key"].rsplit("/", 1)[-1] in output for o in others)


def test_a_flipped_bit_in_the_manifest_breaks_the_signature(bundle: Path) -> None:
    _flip_one_bit(bundle / "manifest.json")
    code, output = _verify(str(bundle))
    assert code & BAD_SIGNATURE, output
    assert "manifest.json: altered" in output


def test_a_flipped_bit_in_the_signature_is_named(bundle: Path) -> None:
    sig_path = bundle / "manifest.sig.json"
    doc = json.loads(sig_path.read_text())
    at = sig_path.read_text().index(doc["signature"]) + 3  # inside the base64 signature
    _flip_one_bit(sig_path, at)
    code, output = _verify(str(bundle))
    assert code == BAD_SIGNATURE, output
    assert "manifest.sig.json: altered" in output


def test_a_missing_and_an_added_object_are_named(bundle: Path) -> None:
    gone = next(bundle.glob("*_report.json"))
    gone.unlink()
    (bundle / "planted.jpg").write_bytes(b"\xff\xd8 not from the scanner")
    code, output = _verify(str(bundle), "--json")
    assert code == MISSING | ADDED
    result = json.loads(output)
    assert result["missing"] == [gone.name] and result["added"] == ["planted.jpg"]
    assert result["signature"] == "valid" and result["verified"] is False


def test_an_unsigned_bundle_does_not_verify(bundle: Path) -> None:
    (bundle / "manifest.sig.json").unlink()
    code, output = _verify(str(bundle))
    assert code == NOT_TRUSTED and "not signed" in output


def test_a_bundle_signed_by_someone_else_is_not_trusted(key_file: Path, tmp_path: Path) -> None:
    """A forger who rewrites objects and manifest and signs with a key of their own gets
    every hash and the signature to match, but not a trusted key."""
    forged = write_bundle(
        LocalStore(tmp_path / "forged"),
        prefix="",
        alert_id="ab" * 16,
        verdict=_verdict(),
        frames=_frames,
        signer=Signer.generate(),
    )
    forged_dir = tmp_path / "forged" / forged.manifest_key.rsplit("/", 1)[0]
    code, output = _verify(str(forged_dir))
    assert code == NOT_TRUSTED, output
    assert "not a key you trust" in output
    # Trusting it explicitly (a partner's published key) makes it verify.
    kid = json.loads((forged_dir / "manifest.sig.json").read_text())["key_id"]
    code, _ = _verify(str(forged_dir), "--key", str(tmp_path / "forged" / "keys" / f"{kid}.pem"))
    assert code == 0


def test_old_bundles_verify_after_a_key_rotation(
    bundle: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_public = Signer.from_settings(SigningSettings(key_file=key_file)).public_pem
    new_key = tmp_path / "keys" / "next.pem"
    res = runner.invoke(app, ["keys", "generate", str(new_key)])
    assert res.exit_code == 0 and (new_key.stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv("SYNTHWATCH_SIGNING__KEY_FILE", str(new_key))
    # Rotated, the old key forgotten: the old bundle is intact but its key is unknown.
    assert _verify(str(bundle))[0] == NOT_TRUSTED
    # The old public key kept among the trusted keys: it verifies against its key id.
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "old.pem").write_text(old_public)
    monkeypatch.setenv("SYNTHWATCH_SIGNING__TRUSTED_KEYS_DIR", str(trusted))
    assert _verify(str(bundle))[0] == 0
    # And a bundle written now is signed with the new key.
    store = LocalStore(tmp_path / "after")
    fresh = write_bundle(
        store,
        prefix="",
        alert_id="ef" * 16,
        verdict=_verdict(),
        frames=_frames,
        signer=Signer.from_settings(SigningSettings(key_file=new_key)),
    )
    folder = fresh.manifest_key.rsplit("/", 1)[0]
    keys = trusted_keys(SigningSettings(key_file=new_key))
    assert verify_bundle(store, folder, keys).exit_code == 0


def test_keys_show_prints_the_key_bundles_are_signed_with(bundle: Path) -> None:
    res = runner.invoke(app, ["keys", "show"])
    assert res.exit_code == 0
    sig = json.loads((bundle / "manifest.sig.json").read_text())
    assert sig["public_key"] in res.output and sig["key_id"] in res.output
    assert "PRIVATE" not in res.output


def test_a_crash_between_manifest_and_signature_is_finished_by_the_retry(
    tmp_path: Path,
) -> None:
    signer = Signer.generate()
    store = LocalStore(tmp_path)
    first = write_bundle(
        store, prefix="ev", alert_id="ab" * 16, verdict=_verdict(), frames=_frames, signer=signer
    )
    folder = first.manifest_key.rsplit("/", 1)[0]
    (tmp_path / folder / "manifest.sig.json").unlink()  # as if the process died here

    def must_not_decode() -> list[EvidenceFrame]:
        raise AssertionError("the retry re-decoded frames the bundle already holds")

    again = write_bundle(
        store,
        prefix="ev",
        alert_id="ab" * 16,
        verdict=_verdict(),
        frames=must_not_decode,
        signer=signer,
    )
    assert again.manifest_sha256 == first.manifest_sha256
    assert verify_bundle(store, folder, {signer.key_id: signer.public}).exit_code == 0


def test_bad_targets_and_keys_get_one_line_errors(tmp_path: Path) -> None:
    code, output = _verify(str(tmp_path / "nowhere"))
    assert code == 2 and "no such bundle folder" in output
    (tmp_path / "empty").mkdir()
    code, output = _verify(str(tmp_path / "empty"))
    assert code == 2 and "not an evidence bundle" in output
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    env = {"SYNTHWATCH_SIGNING__KEY_FILE": str(broken)}
    res = runner.invoke(app, ["keys", "show"], env=env)
    assert res.exit_code == 2 and "not an unencrypted PEM private key" in res.output
    res = runner.invoke(app, ["keys", "generate", str(broken)])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output


def test_without_a_configured_key_one_is_made_once_for_this_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SYNTHWATCH_SIGNING__KEY_FILE", raising=False)
    first = Signer.from_settings(SigningSettings())
    path = tmp_path / "config" / "synthwatch" / "evidence-signing-key.pem"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    assert Signer.from_settings(SigningSettings()).key_id == first.key_id
    assert os.stat(path.parent).st_mode & 0o077 == 0
