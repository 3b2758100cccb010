"""`synthwatch scan` as a user meets it: verdict lines, evidence, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthwatch.pipeline.cli import app
from synthwatch.schemas import Alert, decode
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
    alerts = tmp_path / "out" / "alerts.jsonl"
    # A low review threshold, so the evidence path runs whatever the models' quality.
    args = [str(video), str(image), str(fake_face), "--json", "-", "--evidence-dir", str(evidence)]
    proc = _scan(
        [*args, "--alerts", str(alerts)],
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
    # the frame, the face model's occlusion heatmap beside it, and the forensic maps of a still.
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
    assert heatmap["explains"].endswith(".jpg") and "occlusion map of sbi_face@" in heatmap["note"]
    assert "verdicts" in proc.stderr  # the table goes to stderr when JSON goes to stdout
    # The bundle's folder says which item it is, and `--alerts` holds the very alert
    # records the Kafka pipeline would emit, one per alerting item, pointing at it.
    assert manifest_path.parent.name == f"df00204.jpg_{face['alert_id']}"
    emitted = [decode(line, Alert) for line in alerts.read_bytes().splitlines()]
    alerting = [r for r in lines if "evidence" in r]
    assert [a.alert_id for a in emitted] == [r["alert_id"] for r in alerting]
    assert [a.evidence_uri for a in emitted] == [r["evidence"] for r in alerting]
    assert emitted[-1].manifest_sha256 == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    # The fresh bundle verifies; one flipped bit in the heatmap is found and named.
    verify = [sys.executable, "-m", "synthwatch", "verify", str(manifest_path.parent)]
    env = {**model_env, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stdout + ok.stderr
    png = manifest_path.parent / heatmap["key"].rsplit("/", 1)[-1]
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0x01
    png.write_bytes(bytes(data))
    bad = subprocess.run(verify, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 16, bad.stdout + bad.stderr
    assert f"{png.name}: altered" in bad.stdout


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


def _one_line(output: str) -> str:
    """The CLI's error output as one line; fails if it is more than one or a traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_missing_weights_stop_the_scan_with_one_line_naming_the_model_and_the_fix(
    tmp_path: Path,
) -> None:
    # The weights directory unset or mistyped: a cloned voice used to come out "0.000
    # pass" with exit code 0, the missing audio model mentioned only in a log line.
    image = make_image(tmp_path / "x.jpg")
    models = tmp_path / "mistyped"
    result = runner.invoke(app, ["scan", str(image)], env={"SYNTHWATCH_MODEL_DIR": str(models)})
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert "model_unavailable" in line and "aasist" in line
    assert str(models / "aasist" / "AASIST.pth") in line  # where it was looked for
    assert "SYNTHWATCH_MODELS__AUDIO_MODELS" in line and "SYNTHWATCH_MODEL_DIR" in line
    assert "--allow-missing-models" in line


@pytest.mark.parametrize("allow", [False, True])
def test_a_mistyped_model_name_is_refused_with_a_suggestion(tmp_path: Path, allow: bool) -> None:
    image = make_image(tmp_path / "x.jpg")
    result = runner.invoke(
        app,
        ["scan", str(image), *(["--allow-missing-models"] if allow else [])],
        env={
            "SYNTHWATCH_MODEL_DIR": str(tmp_path),
            "SYNTHWATCH_MODELS__FACE_MODELS": '["sbi_fce"]',
            "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
        },
    )
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert "unknown model 'sbi_fce' in SYNTHWATCH_MODELS__FACE_MODELS" in line
    assert "did you mean 'sbi_face'?" in line


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--backend", "foo"], {}, "--backend"),
        (["--frames", "0"], {}, "--frames"),
        (["--workers", "0"], {}, "--workers"),
        ([], {"SYNTHWATCH_MODELS__BACKEND": "foo"}, "SYNTHWATCH_MODELS__BACKEND"),
        ([], {"SYNTHWATCH_SAMPLE__FRAMES": "-3"}, "SYNTHWATCH_SAMPLE__FRAMES"),
        ([], {"SYNTHWATCH_MODELS__FACE_MODELS": "sbi_face"}, "SYNTHWATCH_MODELS__FACE_MODELS"),
        ([], {"SYNTHWATCH_POLICY__ALERT_ON": '["flag", "sometimes"]'}, "ALERT_ON"),
    ],
)
def test_bad_option_and_setting_values_are_one_line_naming_them(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    image = make_image(tmp_path / "x.jpg")
    result = runner.invoke(
        app, ["scan", str(image), *args], env={"SYNTHWATCH_MODEL_DIR": str(tmp_path), **env}
    )
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert "(config)" in line and named in line
    if "FACE_MODELS" in named:
        assert "is not JSON" in line and '["a", "b"]' in line


def test_an_unwritable_evidence_dir_is_refused_before_the_first_item(tmp_path: Path) -> None:
    image = make_image(tmp_path / "x.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "verdicts.jsonl"
    result = runner.invoke(
        app,
        ["scan", str(image), "--evidence-dir", str(blocker / "ev"), "--json", str(out)],
        # No weights here either: the evidence directory is checked before models load.
        env={"SYNTHWATCH_MODEL_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert f"--evidence-dir {blocker / 'ev'}: cannot write there" in line
    assert not out.exists()


def test_bad_inputs_are_reported_before_any_model_is_loaded(tmp_path: Path) -> None:
    # The model dir is empty, so loading the models would stop the scan: the answer for
    # a missing path and a refused URL comes first, and from the inputs alone.
    result = runner.invoke(
        app,
        ["scan", str(tmp_path / "nope.mp4"), "http://169.254.169.254/latest/", "--json", "-"],
        env={"SYNTHWATCH_MODEL_DIR": str(tmp_path / "empty")},
    )
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["error"] for r in lines] == ["invalid_ref", "refused_address"]
    assert "no such file" in lines[0]["message"] and "metadata" in lines[1]["message"]
    assert "model_unavailable" not in result.output


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


def test_allow_missing_models_scans_with_our_own_and_what_none_can_score_is_inconclusive(
    tmp_path: Path,
) -> None:
    """No ../shared, an empty model dir, `--allow-missing-models`: faces (LBP cascade +
    sbi_face) and whole images (fingerprint), stills and video frames alike, still get
    verdicts; a voice, which only the missing AASIST reads, is inconclusive: no score,
    never a pass, and the note names the model that did not run."""
    from PIL import Image
    from skimage import data

    from tests.media_factory import make_audio

    face = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(face, quality=92)
    photo = make_image(tmp_path / "photo.png", width=320, height=240, fmt="PNG")
    tiff = tmp_path / "scan.tif"
    Image.fromarray(data.coffee()).save(tiff, format="TIFF", compression="tiff_lzw")
    avif = tmp_path / "photo.avif"
    Image.fromarray(data.chelsea()).save(avif, format="AVIF")
    clip = make_video(tmp_path / "no_face.mp4", seconds=2.0, width=320, height=240, audio=True)
    voice = make_audio(tmp_path / "voice.wav", seconds=2.0)
    items = [face, photo, tiff, avif, clip, voice]
    env = {
        "SYNTHWATCH_MODEL_DIR": str(tmp_path / "empty"),
        "HOME": str(tmp_path / "home"),
        # A desk that wants a person to look at what the detectors could not score.
        "SYNTHWATCH_POLICY__ALERT_ON": '["inconclusive"]',
    }
    evidence = tmp_path / "evidence"
    proc = _scan(
        [
            *map(str, items),
            "--allow-missing-models",
            "--json",
            "-",
            "--evidence-dir",
            str(evidence),
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    by_source = {r["source"]: r for r in map(json.loads, proc.stdout.splitlines())}
    astronaut, png, tif, avi, video, wav = (by_source[str(p)] for p in items)
    assert astronaut["faces_found"] == 1 and astronaut["face_detections"] == 1
    assert {"sbi_face", "scene_probe", "fingerprint"} <= {s["name"] for s in astronaut["signals"]}
    # The scene probe reads stills as large as it was trained on (512 px and more) only.
    assert "scene_probe" not in {s["name"] for s in png["signals"]}
    assert any(
        n.startswith("scene_probe did not score: the image is 320x240") for n in png["notes"]
    )
    assert "scene_probe" not in {s["name"] for s in video["signals"]}
    assert astronaut["frames"][0]["region"] == "faces"
    for still in (png, tif, avi):
        assert still["media_type"] == "image" and still["synthetic_score"] is not None
        assert "fingerprint" in still["decided_by"]
    assert next(s["name"] for s in png["signals"] if s["modality"] == "image") == "fingerprint"
    assert png["frames"][0]["region"] == "frame"
    # A video with no face is scored by the whole-image model, frame by frame.
    assert video["faces_found"] == 0 and video["synthetic_score"] is not None
    assert video["decided_by"] == ["fingerprint"]
    assert {f["region"] for f in video["frames"]} == {"frame"} and len(video["frames"]) > 1
    # Its soundtrack is left alone, and the note no longer recommends what flags real
    # clips (AASIST on soundtracks, docs/EVALUATION.md).
    assert any("soundtrack not scored" in n for n in video["notes"])
    assert not any("AUDIO_ON_VIDEO=true" in n for n in video["notes"])
    assert wav["media_type"] == "audio" and wav["decision"] == "inconclusive"
    assert wav["synthetic_score"] is None
    assert any(n.startswith("aasist did not run: aasist: weights missing") for n in wav["notes"])
    assert any("not evidence of authenticity" in n for n in wav["notes"])
    assert not any("aasist" in n for n in png["notes"])  # only where it would have run
    # Only the inconclusive item alerts here; its bundle holds the verdict, score null.
    assert [r["source"] for r in (astronaut, png, tif, avi, video, wav) if "evidence" in r] == [
        str(voice)
    ]
    manifest = json.loads(Path(wav["evidence"].removeprefix("file://")).read_text())
    report_key = next(o["key"] for o in manifest["objects"] if o["key"].endswith("report.json"))
    report = json.loads((evidence / report_key).read_text())
    assert report["verdict"]["decision"] == "inconclusive"
    assert report["verdict"]["synthetic_score"] is None
    assert "inconclusive" in proc.stderr  # the table shows the decision, no number


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
    assert "c2pa" in tampered["decided_by"]  # it forced the decision: it is named
    # No manifest: no provenance signal; the models decide.
    assert plain["provenance"]["present"] is False
    assert "c2pa" not in {s["name"] for s in plain["signals"]}


def test_a_detect_worker_with_missing_weights_stops_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["worker", "--role", "detect"],
        env={"SYNTHWATCH_MODEL_DIR": str(tmp_path / "empty"), "SYNTHWATCH_WORK_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert "aasist: weights missing" in line and "--allow-missing-models" in line


def test_a_sink_worker_without_an_endpoint_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SYNTHWATCH_SINK__URL", raising=False)
    monkeypatch.setenv("SYNTHWATCH_WORK_DIR", str(tmp_path))
    result = runner.invoke(app, ["worker", "--role", "sink"])
    assert result.exit_code == 2
    assert "SYNTHWATCH_SINK__URL" in result.output
    assert "Traceback" not in result.output
