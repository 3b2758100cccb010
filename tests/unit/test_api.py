"""`synthwatch serve`'s API as a client meets it: real scans of generated media with the
shipped `fingerprint` model, keys, upload caps, reviews, the audit log, callbacks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from synthwatch.errors import ConfigError
from synthwatch.operators.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from synthwatch.pipeline import audit
from synthwatch.pipeline.api import Auth, create_app, load_keys, serve
from synthwatch.pipeline.engine import Engine
from synthwatch.pipeline.scans import ScanService
from synthwatch.pipeline.settings import ApiSettings, Settings
from tests.api_harness import (
    AUTH,
    KEY,
    KEYS,
    OTHER_KEY,
    LocalServer,
    api_settings,
    lean_engine,
    running_service,
    wait_finished,
)
from tests.media_factory import make_image

CALLBACK_SECRET = "callback-secret-for-tests"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with lean_engine(tmp_path_factory.mktemp("engine")) as eng:
        yield eng


def _client(settings: Settings, engine: Engine) -> Iterator[tuple[TestClient, ScanService]]:
    with running_service(settings, engine) as service:
        yield TestClient(create_app(service, Auth(KEYS))), service


@pytest.fixture
def api(tmp_path: Path, engine: Engine) -> Iterator[tuple[TestClient, ScanService]]:
    settings = api_settings(tmp_path, callback_secret=SecretStr(CALLBACK_SECRET))
    yield from _client(settings, engine)


@pytest.fixture
def png(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "photo.png", width=160, height=120, fmt="PNG").read_bytes()


def _upload(client: TestClient, data: bytes, name: str = "photo.png", **headers: str) -> str:
    response = client.post("/v1/scans", files={"file": (name, data)}, headers={**AUTH, **headers})
    assert response.status_code == 202, response.text
    scan_id: str = response.json()["id"]
    assert response.headers["Location"] == f"/v1/scans/{scan_id}"
    return scan_id


def test_an_upload_is_accepted_scanned_and_reported(
    api: tuple[TestClient, ScanService], png: bytes
) -> None:
    client, service = api
    scan_id = _upload(client, png)
    record = wait_finished(client, scan_id)
    assert record["status"] == "done", record
    assert record["source"] == "photo.png" and record["client"] == "desk"
    assert record["decision"] in ("flag", "review", "pass", "inconclusive")
    assert record["automatic_decision"] == record["decision"]
    assert record["review"] is None and record["verdict"]["sha256"] == record["sha256"]
    # Neither the server's paths nor its upload folder leak into the verdict.
    assert str(service.uploads_dir) not in json.dumps(record)
    # Every finished scan has a report, whatever its decision.
    report = client.get(record["report"], headers=AUTH)
    assert report.status_code == 200
    if report.headers["content-type"].startswith("application/json"):
        assert report.json()["verdict"]["sha256"] == record["sha256"]
    else:
        assert "default-src 'none'" in report.headers["content-security-policy"]
    assert [s["id"] for s in client.get("/v1/scans", headers=AUTH).json()] == [scan_id]
    events = [(e["event"], e["scan_id"]) for e in service.audit.entries()]
    assert events == [("scan_submitted", scan_id), ("scan_finished", scan_id)]
    assert not list(service.uploads_dir.iterdir()), "the upload is deleted after the scan"


def test_requests_without_a_key_or_with_a_wrong_one_are_refused(
    api: tuple[TestClient, ScanService],
) -> None:
    client, _service = api
    for headers in ({}, {"X-API-Key": "not-a-key-0123456789"}, {"Authorization": "Bearer x"}):
        response = client.get("/v1/scans", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["detail"]
    assert client.get("/v1/scans", headers={"Authorization": f"Bearer {OTHER_KEY}"}).is_success
    refused = client.post("/v1/scans", json={"url": "http://example.org/a.jpg"})
    assert refused.status_code == 401


def test_an_upload_over_the_cap_is_413_and_leaves_nothing_behind(
    tmp_path: Path, engine: Engine
) -> None:
    settings = api_settings(tmp_path, max_upload_bytes=4096)
    for client, service in _client(settings, engine):
        response = client.post(
            "/v1/scans", files={"file": ("big.png", b"\x89PNG" + b"0" * 10_000)}, headers=AUTH
        )
        assert response.status_code == 413
        assert "4096 bytes" in response.json()["detail"]
        assert "SYNTHWATCH_API__MAX_UPLOAD_BYTES" in response.json()["detail"]
        assert not list(service.uploads_dir.iterdir())
        assert client.get("/v1/scans", headers=AUTH).json() == []


@pytest.mark.parametrize(
    ("data", "says"),
    [(b"", "it is empty"), (b"just some notes\n" * 40, "not an image, video or audio")],
    ids=["empty", "text"],
)
def test_a_file_that_is_not_media_ends_in_a_clear_error(
    api: tuple[TestClient, ScanService], data: bytes, says: str
) -> None:
    client, _service = api
    scan_id = _upload(client, data, name="notes.jpg")
    record = wait_finished(client, scan_id)
    assert record["status"] == "error" and record["reason"] == "unsupported_media"
    assert says in record["error"] and record["decision"] is None
    report = client.get(f"/v1/scans/{scan_id}/report", headers=AUTH)
    assert report.status_code == 404
    assert "ended in an error (unsupported_media)" in report.json()["detail"]
    review = client.post(
        f"/v1/scans/{scan_id}/review", json={"decision": "pass", "reason": "ok"}, headers=AUTH
    )
    assert review.status_code == 409


def test_a_review_overrides_the_decision_and_lands_in_the_audit_log(
    api: tuple[TestClient, ScanService], png: bytes
) -> None:
    client, service = api
    scan_id = _upload(client, png)
    automatic = wait_finished(client, scan_id)["automatic_decision"]
    human = "pass" if automatic == "flag" else "flag"
    other = {"X-API-Key": OTHER_KEY}
    response = client.post(
        f"/v1/scans/{scan_id}/review",
        json={"decision": human, "reason": "  seen the original on the agency wire  "},
        headers=other,
    )
    assert response.status_code == 200, response.text
    record = client.get(f"/v1/scans/{scan_id}", headers=AUTH).json()
    assert record["decision"] == human and record["automatic_decision"] == automatic
    assert record["review"]["reviewer"] == "other"
    assert record["review"]["reason"] == "seen the original on the agency wire"
    assert record["review"]["previous_decision"] == automatic
    listed = client.get("/v1/scans", params={"decision": human}, headers=AUTH).json()
    assert [s["id"] for s in listed] == [scan_id]
    assert client.get("/v1/scans", params={"decision": automatic}, headers=AUTH).json() == []
    entry = service.audit.entries()[-1]
    assert entry["event"] == "review_recorded" and entry["client"] == "other"
    assert (entry["decision"], entry["previous_decision"]) == (human, automatic)
    assert entry["reason"] == "seen the original on the agency wire"
    assert audit.verify(service.audit.path) == []


@pytest.mark.parametrize(
    "body",
    [
        {"decision": "flag", "reason": "   "},
        {"decision": "flag"},
        {"decision": "inconclusive", "reason": "a person decides, detectors do not"},
        {"decision": "maybe", "reason": "x"},
    ],
    ids=["blank-reason", "no-reason", "inconclusive", "unknown"],
)
def test_a_review_needs_a_human_decision_and_a_reason(
    api: tuple[TestClient, ScanService], png: bytes, body: dict[str, str]
) -> None:
    client, _service = api
    scan_id = _upload(client, png)
    wait_finished(client, scan_id)
    response = client.post(f"/v1/scans/{scan_id}/review", json=body, headers=AUTH)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)
    assert client.get(f"/v1/scans/{scan_id}", headers=AUTH).json()["review"] is None


def test_unknown_scans_are_404(api: tuple[TestClient, ScanService]) -> None:
    client, _service = api
    missing = "0" * 32
    assert client.get(f"/v1/scans/{missing}", headers=AUTH).status_code == 404
    assert client.get(f"/v1/scans/{missing}/report", headers=AUTH).status_code == 404
    review = client.post(
        f"/v1/scans/{missing}/review", json={"decision": "pass", "reason": "x"}, headers=AUTH
    )
    assert review.status_code == 404
    assert client.get("/v1/scans/../../etc/passwd", headers=AUTH).status_code == 404


def test_a_url_is_fetched_and_scanned_and_the_callback_is_signed(
    api: tuple[TestClient, ScanService], png: bytes
) -> None:
    client, _service = api
    with LocalServer({"/media/photo.png": png}) as origin:
        response = client.post(
            "/v1/scans",
            json={
                "url": f"{origin.url}/media/photo.png?token=s3cr3t",
                "callback_url": f"{origin.url}/hook",
            },
            headers=AUTH,
        )
        assert response.status_code == 202, response.text
        record = wait_finished(client, response.json()["id"])
        assert record["status"] == "done", record
        assert "s3cr3t" not in json.dumps(record)
        assert origin.posted.wait(30)
    path, headers, body = origin.posts[0]
    assert path == "/hook"
    assert verify_signature(
        CALLBACK_SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER]
    )
    assert json.loads(body)["id"] == record["id"]
    assert json.loads(body)["decision"] == record["decision"]


def test_refused_addresses_are_refused_for_fetches_and_callbacks(
    tmp_path: Path, engine: Engine
) -> None:
    settings = api_settings(
        tmp_path, allow_private=False, callback_secret=SecretStr(CALLBACK_SECRET)
    )
    for client, _service in _client(settings, engine):
        for body in (
            {"url": "http://127.0.0.1:9/a.png"},
            {"url": "https://example.org/a.png", "callback_url": "http://169.254.169.254/x"},
            {"url": "https://example.org/a.png", "callback_url": "http://10.0.0.8/hook"},
            {"url": "file:///etc/passwd"},
            {"url": "/etc/passwd"},
        ):
            response = client.post("/v1/scans", json=body, headers=AUTH)
            assert response.status_code == 422, body
            assert "refused" in response.json()["detail"]
        assert client.get("/v1/scans", headers=AUTH).json() == []


def test_a_callback_needs_a_signing_secret(tmp_path: Path, engine: Engine) -> None:
    for client, _service in _client(api_settings(tmp_path), engine):
        response = client.post(
            "/v1/scans",
            json={"url": "http://127.0.0.1:9/a.png", "callback_url": "http://127.0.0.1:9/h"},
            headers=AUTH,
        )
        assert response.status_code == 422
        assert "SYNTHWATCH_API__CALLBACK_SECRET" in response.json()["detail"]


def test_a_restart_keeps_history_and_marks_unfinished_scans_interrupted(
    tmp_path: Path, engine: Engine, png: bytes
) -> None:
    settings = api_settings(tmp_path)
    for client, service in _client(settings, engine):
        done_id = _upload(client, png)
        wait_finished(client, done_id)
        stuck = service.get(done_id).model_copy(
            update={"id": "f" * 32, "status": "running", "decision": None}
        )
        (settings.api.data_dir / "scans" / f"{'f' * 32}.json").write_text(stuck.model_dump_json())
    for client, _service in _client(settings, engine):
        assert client.get(f"/v1/scans/{done_id}", headers=AUTH).json()["status"] == "done"
        interrupted = client.get(f"/v1/scans/{'f' * 32}", headers=AUTH).json()
        assert interrupted["status"] == "error" and interrupted["reason"] == "interrupted"


def test_an_edited_audit_line_is_detected_and_the_server_will_not_append(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path)
    for n in range(3):
        log.append("scan_submitted", scan_id=f"{n:032x}", client="desk")
    log.close()
    assert audit.verify(path) == []
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"client":"desk"', '"client":"other"')
    path.write_text("\n".join(lines) + "\n")
    problems = audit.verify(path)
    assert len(problems) == 1 and problems[0].startswith("line 3: its prev does not match")
    with pytest.raises(ConfigError, match="fails verification: line 3"):
        audit.AuditLog(path)


def test_a_removed_audit_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path)
    for n in range(3):
        log.append("review_recorded", scan_id=f"{n:032x}")
    log.close()
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[2] + "\n")
    assert audit.verify(path)[0].startswith("line 2: its prev does not match")


def test_keys_come_from_settings_and_a_file_and_weak_ones_are_refused(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# clients\nnewsdesk:{KEY}\n\nsoc: {OTHER_KEY}\n")
    api = ApiSettings(keys={"ops": SecretStr("o" * 20)}, keys_file=keys_file)
    assert load_keys(api) == {"ops": "o" * 20, "newsdesk": KEY, "soc": OTHER_KEY}
    keys_file.write_text(json.dumps({"newsdesk": KEY}))
    assert load_keys(ApiSettings(keys_file=keys_file)) == {"newsdesk": KEY}
    with pytest.raises(ConfigError, match="at least 16"):
        load_keys(ApiSettings(keys={"ops": SecretStr("short")}))
    with pytest.raises(ConfigError, match="same key"):
        load_keys(ApiSettings(keys={"a": SecretStr(KEY), "b": SecretStr(KEY)}))
    with pytest.raises(ConfigError, match="client name"):
        load_keys(ApiSettings(keys={"<script>": SecretStr(KEY)}))


def test_serve_refuses_to_start_without_keys_or_insecurely_on_a_public_address(
    tmp_path: Path,
) -> None:
    settings = api_settings(tmp_path, keys={})
    with pytest.raises(ConfigError, match="no API keys"):
        serve(settings)
    public = settings.model_copy(
        update={"api": settings.api.model_copy(update={"host": "0.0.0.0"})}
    )
    with pytest.raises(ConfigError, match="loopback"):
        serve(public, insecure_no_auth=True)


def test_the_openapi_document_is_served_and_docs_that_load_a_cdn_are_not(
    api: tuple[TestClient, ScanService],
) -> None:
    client, _service = api
    spec = client.get("/openapi.json").json()
    assert {"/v1/scans", "/v1/scans/{scan_id}", "/v1/scans/{scan_id}/report"} <= set(spec["paths"])
    assert "/" not in spec["paths"]
    assert client.get("/docs").status_code == 404


# --- the review page, without a browser (tests/browser drives it in Chromium) --------


def _login(client: TestClient) -> str:
    response = client.post("/login", data={"key": KEY}, follow_redirects=False)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/").text
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match
    return match.group(1)


def test_the_page_needs_a_login_and_a_csrf_token_and_escapes_names(
    api: tuple[TestClient, ScanService], png: bytes
) -> None:
    client, _service = api
    first = client.get("/", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/login"
    assert client.post("/login", data={"key": "wrong-key-0123456789"}).status_code == 401
    csrf = _login(client)
    home = client.get("/")
    assert "default-src 'none'" in home.headers["content-security-policy"]
    forged = client.post("/ui/scans", files={"file": ("a.png", png)}, data={"csrf": "forged"})
    assert forged.status_code == 403
    upload = client.post(
        "/ui/scans",
        files={"file": ("<img src=x onerror=alert(1)>.png", png)},
        data={"csrf": csrf},
        follow_redirects=False,
    )
    assert upload.status_code == 303
    scan_id = upload.headers["location"].rsplit("/", 1)[-1]
    wait_finished(client, scan_id)
    page = client.get(f"/scans/{scan_id}").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    # A session reads through the API (the page links to reports) but cannot change it.
    assert client.get(f"/v1/scans/{scan_id}/report").status_code == 200
    review = client.post(f"/v1/scans/{scan_id}/review", json={"decision": "flag", "reason": "x"})
    assert review.status_code == 401
    done = client.post(
        f"/ui/scans/{scan_id}/review",
        data={"csrf": csrf, "decision": "flag", "reason": "checked"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert client.get(f"/v1/scans/{scan_id}").json()["decision"] == "flag"
