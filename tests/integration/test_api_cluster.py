"""`synthwatch serve` in cluster mode against the real broker and store, with a real
worker: an upload becomes a MediaRef, the pipeline's verdict and alert come back, and
the report is the decide stage's signed bundle in S3; a decision that does not alert
gets a bundle the server writes; a file that is not media ends in error from the DLQ."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from synthwatch.operators.evidence import verify_bundle
from synthwatch.operators.signing import Signer, SigningSettings, trusted_keys
from synthwatch.operators.store import S3Store, s3_client
from synthwatch.pipeline.api import Auth, create_app
from synthwatch.pipeline.scans import ScanService
from synthwatch.pipeline.settings import load
from tests.api_harness import AUTH, KEYS, wait_finished
from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.media_factory import make_audio, make_image
from tests.private_services import free_port

pytestmark = pytest.mark.integration


def _env(services: Services, tmp: Path, run: str) -> dict[str, str]:
    """One environment for the worker and the server: the same topics, bucket and policy."""
    return {
        **os.environ,
        "SYNTHWATCH_MODEL_DIR": str(tmp / "no-third-party-weights"),
        # The shipped whole-image model only, so no ../shared is needed; no audio model,
        # so a voice is `inconclusive` (a decision that does not alert).
        "SYNTHWATCH_MODELS__FACE_MODELS": "[]",
        "SYNTHWATCH_MODELS__IMAGE_MODELS": '["fingerprint"]',
        "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
        "SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS": services.bootstrap,
        "SYNTHWATCH_KAFKA__APP_ID": f"synthwatch-api-{run}",
        "SYNTHWATCH_KAFKA__PARTITIONS": "2",
        "SYNTHWATCH_KAFKA__TOPIC_REFS": f"{run}.media.refs",
        "SYNTHWATCH_KAFKA__TOPIC_FETCHED": f"{run}.media.fetched",
        "SYNTHWATCH_KAFKA__TOPIC_VERDICTS": f"{run}.media.verdicts",
        "SYNTHWATCH_KAFKA__TOPIC_ALERTS": f"{run}.media.alerts",
        "SYNTHWATCH_KAFKA__TOPIC_DLQ": f"{run}.media.dlq",
        "SYNTHWATCH_KAFKA__TOPIC_RETRY": f"{run}.media.retry",
        "SYNTHWATCH_S3__ENDPOINT_URL": services.s3_endpoint,
        "SYNTHWATCH_S3__ACCESS_KEY_ID": services.access_key,
        "SYNTHWATCH_S3__SECRET_ACCESS_KEY": services.secret_key,
        "SYNTHWATCH_S3__BUCKET": services.bucket,
        # Every scored still flags, so the alert path runs on generated media.
        "SYNTHWATCH_POLICY__FLAG_THRESHOLD": "0.0",
        "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": "0.0",
        "SYNTHWATCH_POLICY__VERSION": f"policy-{run}",
        "SYNTHWATCH_API__MODE": "cluster",
        "SYNTHWATCH_API__DATA_DIR": str(tmp / "api"),
        "SYNTHWATCH_WEB_PORT": str(free_port()),
    }


@pytest.fixture
def cluster(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, ScanService]]:
    run = uuid.uuid4().hex[:8]
    env = _env(services, tmp_path, run)
    synthwatch(env, "topics", "create")
    worker = start_worker(env, "all", tmp_path / "worker.log")
    for name, value in env.items():
        if name.startswith("SYNTHWATCH_"):
            monkeypatch.setenv(name, value)
    service = ScanService(load(), signer=Signer.generate())
    service.start()
    try:
        yield TestClient(create_app(service, Auth(KEYS))), service
    finally:
        service.close()
        stop_workers(worker)
        print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def test_scans_go_through_the_pipeline_and_come_back_with_reports(
    cluster: tuple[TestClient, ScanService], tmp_path: Path
) -> None:
    client, service = cluster
    photo = make_image(tmp_path / "photo.png", width=320, height=240, fmt="PNG")
    voice = make_audio(tmp_path / "voice.wav", seconds=2.0)
    ids = {}
    for path in (photo, voice):
        response = client.post(
            "/v1/scans", files={"file": (path.name, path.read_bytes())}, headers=AUTH
        )
        assert response.status_code == 202, response.text
        ids[path.name] = response.json()["id"]
    text = client.post("/v1/scans", files={"file": ("notes.txt", b"not media\n")}, headers=AUTH)
    assert text.status_code == 202

    flagged = wait_finished(client, ids["photo.png"], timeout_s=240)
    assert flagged["status"] == "done", flagged
    assert flagged["decision"] == "flag" and flagged["alert_id"]
    assert flagged["verdict"]["id"] == ids["photo.png"]
    # The report is the decide stage's bundle, in S3, signed with the workers' key.
    report = client.get(f"/v1/scans/{ids['photo.png']}/report", headers=AUTH)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert b"photo.png" in report.content
    store = S3Store(s3_client(service.settings.s3), service.settings.s3.bucket)
    manifests = [
        k
        for k in store.list_keys("evidence")
        if k.endswith(f"_{flagged['alert_id']}/manifest.json")
    ]
    assert len(manifests) == 1
    check = verify_bundle(store, manifests[0].rsplit("/", 1)[0], trusted_keys(SigningSettings()))
    assert check.exit_code == 0, check.problems
    roles = {o["role"] for o in json.loads(store.get_bytes(manifests[0]))["objects"]}
    assert {"frame", "report", "report_html"} <= roles

    # Inconclusive does not alert: the server writes the bundle, with its own key.
    quiet = wait_finished(client, ids["voice.wav"], timeout_s=240)
    assert quiet["status"] == "done" and quiet["decision"] == "inconclusive", quiet
    assert quiet["alert_id"] is None
    page = client.get(f"/v1/scans/{ids['voice.wav']}/report", headers=AUTH)
    assert page.status_code == 200 and b"inconclusive" in page.content.lower()

    # What the fetch stage refuses comes back from the DLQ, with its reason.
    failed = wait_finished(client, text.json()["id"], timeout_s=240)
    assert failed["status"] == "error" and failed["reason"] == "unsupported_media", failed
