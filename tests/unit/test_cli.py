"""`synthwatch scan` as a user meets it: verdict lines, evidence, and one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthwatch.pipeline.cli import app
from tests.media_factory import make_corrupt, make_image, make_video

runner = CliRunner()


def _scan(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthwatch", "scan", *args],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def model_env(shared_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "SYNTHWATCH_MODEL_DIR": str(shared_dir / "weights"),
        "HOME": str(tmp_path / "home"),
        "SYNTHWATCH_SAMPLE__FRAMES": "6",
    }


@pytest.mark.shared
def test_scan_writes_one_json_line_per_item_and_evidence(
    model_env: dict[str, str], shared_dir: Path, tmp_path: Path
) -> None:
    video = make_video(tmp_path / "clip.mp4", seconds=2.0, faces=True, audio=True)
    image = make_image(tmp_path / "photo.png", width=320, height=240, fmt="PNG")
    fake_face = shared_dir / "media/dev/fake/df00204.jpg"
    evidence = tmp_path / "evidence"
    # A low review threshold, so the evidence path runs whatever the models' quality.
    proc = _scan(
        [str(video), str(image), str(fake_face), "--json", "-", "--evidence-dir", str(evidence)],
        {**model_env, "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": "0.2"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["source"] for r in lines] == [str(video), str(image), str(fake_face)]
    for rec in lines:
        for key in (
            "source",
            "sha256",
            "media_type",
            "synthetic_score",
            "decision",
            "signals",
            "segments",
        ):
            assert key in rec
        assert 0.0 <= rec["synthetic_score"] <= 1.0
    assert [r["media_type"] for r in lines] == ["video", "image", "image"]
    assert lines[0]["has_audio"] is True
    # A picture without a face says so: the face model's score on it is weak evidence.
    assert lines[1]["faces_found"] == 0
    assert lines[1]["frames"][0]["region"] == "frame"
    assert any("no face found" in n for n in lines[1]["notes"])
    # The DeepFake test face from MesoNet's repository alerts, with evidence that shows
    # the frame, the face model's Grad-CAM beside it, and the forensic maps of a still.
    face = lines[2]
    assert face["decision"] in ("review", "flag")
    assert face["faces_found"] == 1 and "sbi_face" in {s["name"] for s in face["signals"]}
    manifest_path = Path(face["evidence"].removeprefix("file://"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["media_sha256"] == face["sha256"]
    roles = [o["role"] for o in manifest["objects"]]
    assert roles.count("frame") == 1 and roles.count("heatmap") == 1
    assert roles.count("forensic_map") == 2  # error level + residual spectrum
    heatmap = next(o for o in manifest["objects"] if o["role"] == "heatmap")
    assert heatmap["explains"].endswith(".jpg") and "Grad-CAM of sbi_face@" in heatmap["note"]
    assert "verdicts" in proc.stderr  # the table goes to stderr when JSON goes to stdout


@pytest.mark.shared
def test_a_bad_item_is_reported_and_the_others_still_scanned(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    good = make_image(tmp_path / "ok.jpg", width=200, height=200)
    broken = make_corrupt(tmp_path / "broken.mp4", make_video(tmp_path / "src.mp4"), keep=0.2)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    proc = _scan([str(good), str(broken), str(text), "--json", "-"], model_env)
    assert proc.returncode == 1
    lines = {r["source"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert lines[str(good)]["decision"] in ("pass", "review", "flag")
    assert lines[str(broken)]["error"] == "corrupt_media"
    assert lines[str(text)]["error"] == "unsupported_media"
    assert "Traceback" not in proc.stderr


def test_missing_required_weights_are_one_clear_line(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["scan", str(tmp_path / "x.jpg")],
        env={
            "SYNTHWATCH_MODEL_DIR": str(tmp_path),
            "SYNTHWATCH_MODELS__FACE_MODELS": '["sbi_face", "meso4_df"]',
            "SYNTHWATCH_MODELS__REQUIRE_ALL": "true",
        },
    )
    assert result.exit_code == 2
    assert "model_unavailable" in result.output
    assert str(tmp_path) in result.output.replace("\n", "")
    assert "Traceback" not in result.output


@pytest.mark.shared
def test_missing_file_is_an_error_not_a_traceback(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    proc = _scan([str(tmp_path / "nope.mp4")], model_env)
    assert proc.returncode == 1
    assert "nope.mp4" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.shared
def test_loopback_and_metadata_urls_are_refused_without_a_connection(
    model_env: dict[str, str],
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    urls = [
        f"http://127.0.0.1:{port}/a.mp4",
        f"http://2130706433:{port}/a.mp4",  # 127.0.0.1 as one decimal number
        f"http://0x7f.1:{port}/a.mp4",
        f"http://[::ffff:127.0.0.1]:{port}/a.mp4",
    ]
    try:
        proc = _scan([*urls, "--json", "-"], model_env)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert accepted == [], "the guard let a connection through"
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["error"] for r in lines] == ["refused_address"] * len(urls)


@pytest.mark.shared
def test_metadata_and_private_urls_are_refused_before_any_connect(
    model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only loopback may really be contacted by a test, so the connect call itself is
    # intercepted: a failing guard would be caught here, not on the network.
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1"):
            attempts.append(address)
            raise OSError("test interception: non-loopback connect")
        real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    urls = [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one decimal number
        "http://[fd00:ec2::254]/latest/",
        "http://10.1.2.3/a.mp4",
        "http://100.64.0.1/a.mp4",
    ]
    result = runner.invoke(app, ["scan", *urls, "--json", "-"], env=model_env)
    assert attempts == []
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["error"] for r in lines] == ["refused_address"] * len(urls)
    assert "metadata" in lines[0]["message"]


def test_an_unwritable_json_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(
        app,
        ["scan", str(tmp_path / "x.jpg"), "--json", str(blocker / "sub" / "out.jsonl")],
        env={"SYNTHWATCH_MODEL_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.shared
def test_scan_of_a_url_downloads_hashes_and_scores_it(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    import functools
    import hashlib
    import http.server

    served = tmp_path / "www"
    served.mkdir()
    image = make_image(served / "p.jpg", width=200, height=160)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/p.jpg"
    try:
        # Loopback is refused by default; a trusted deployment names the network it allows.
        env = {**model_env, "SYNTHWATCH_FETCH__ALLOW_NETWORKS": '["127.0.0.0/8"]'}
        proc = _scan([url, "--json", "-"], env)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    (rec,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rec["source"] == url
    assert rec["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert rec["media_type"] == "image"


def test_a_fresh_machine_without_third_party_weights_scans_with_our_own_models(
    tmp_path: Path,
) -> None:
    """No ../shared, an empty model dir: faces (LBP cascade + sbi_face) and whole images
    (fingerprint) still get verdicts; audio says plainly that no audio model ran."""
    from PIL import Image
    from skimage import data

    from tests.media_factory import make_audio

    face = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(face, quality=92)
    photo = make_image(tmp_path / "photo.png", width=320, height=240, fmt="PNG")
    voice = make_audio(tmp_path / "voice.wav", seconds=2.0)
    env = {"SYNTHWATCH_MODEL_DIR": str(tmp_path / "empty"), "HOME": str(tmp_path / "home")}
    proc = _scan([str(face), str(photo), str(voice), "--json", "-"], env)
    assert proc.returncode == 0, proc.stderr
    by_source = {r["source"]: r for r in map(json.loads, proc.stdout.splitlines())}
    astronaut, png, wav = by_source[str(face)], by_source[str(photo)], by_source[str(voice)]
    assert astronaut["faces_found"] >= 1
    assert {"sbi_face", "fingerprint"} <= {s["name"] for s in astronaut["signals"]}
    assert astronaut["frames"][0]["region"] == "faces"
    assert next(s["name"] for s in png["signals"] if s["modality"] == "image") == "fingerprint"
    assert png["frames"][0]["region"] == "frame" and "fingerprint" in png["decided_by"]
    assert wav["media_type"] == "audio" and wav["decision"] == "pass"
    assert any("no audio model" in n for n in wav["notes"])
    assert any("not evidence of authenticity" in n for n in wav["notes"])


@pytest.mark.shared
def test_c2pa_fixtures_are_classified_exactly(model_env: dict[str, str], shared_dir: Path) -> None:
    prov = shared_dir / "media/provenance"
    files = [
        prov / "c2pa_ai_declared_valid_C.jpg",
        prov / "c2pa_tampered_invalid_XCA.jpg",
        prov / "no_manifest_A.jpg",
    ]
    proc = _scan([*map(str, files), "--json", "-"], model_env)
    assert proc.returncode == 0, proc.stderr
    ai, tampered, plain = (json.loads(line) for line in proc.stdout.splitlines())
    # A valid manifest declaring synthetic media decides on its own.
    assert ai["provenance"]["present"] and ai["provenance"]["valid"]
    assert ai["decision"] == "flag" and ai["decided_by"] == ["c2pa"]
    assert ai["synthetic_score"] == 1.0
    # A manifest that fails validation is a finding: at least review, whatever the models say.
    assert tampered["provenance"]["present"] and tampered["provenance"]["valid"] is False
    assert tampered["provenance"]["errors"]
    assert tampered["decision"] in ("review", "flag")
    assert [s["decides"] for s in tampered["signals"] if s["name"] == "c2pa"] == ["review"]
    # No manifest: no provenance signal; the models decide.
    assert plain["provenance"]["present"] is False
    assert "c2pa" not in {s["name"] for s in plain["signals"]}


def test_a_sink_worker_without_an_endpoint_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SYNTHWATCH_SINK__URL", raising=False)
    monkeypatch.setenv("SYNTHWATCH_WORK_DIR", str(tmp_path))
    result = runner.invoke(app, ["worker", "--role", "sink"])
    assert result.exit_code == 2
    assert "SYNTHWATCH_SINK__URL" in result.output
    assert "Traceback" not in result.output
