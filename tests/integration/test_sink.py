"""The alert sink as a SOC runs it: a real `worker --role sink` process reading the alerts
topic of a real broker and POSTing OCSF findings to a receiver on 127.0.0.1.

What the receiver's operator would check: each alert arrives signed and verifiable,
once per alert id after dedup, an endpoint hiccup is retried, an alert the endpoint
refuses ends in the DLQ with reason `delivery` and comes back with `dlq replay`, the
trace context rides along, and the worker's metrics count it all.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from synthwatch.operators.webhook import verify_signature
from synthwatch.schemas import Alert, Segment, encode
from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.private_services import free_port

SECRET = "whsec-integration-5e1f"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Receiver:
    """Answers 503 to the first POST of `flaky` ids, 400 to every POST of `refused` ids."""

    flaky: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        alert_id = headers.get("x-synthwatch-alert-id", "")
        with self.lock:
            self.posts.append((headers, body))
            if alert_id in self.refused:
                return 400
            if alert_id in self.flaky:
                self.flaky.discard(alert_id)
                return 503
            return 200

    def delivered(self) -> dict[str, dict[str, Any]]:
        """OCSF findings by alert id, from the POSTs that got a 200."""
        with self.lock:
            posts = list(self.posts)
        out = {}
        for headers, body in posts:
            alert_id = headers["x-synthwatch-alert-id"]
            if alert_id not in self.refused:
                out[alert_id] = json.loads(body)
        return out


@pytest.fixture
def receiver() -> Iterator[tuple[str, Receiver]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = state.answer({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/siem/ingest", state
    server.shutdown()


def _alert(n: int) -> Alert:
    sha = f"{n:02x}" * 32
    return Alert(
        alert_id=f"{n:032x}",
        id=f"media-{n}",
        url=f"https://cdn.example.org/{n}.mp4",
        source="it",
        sha256=sha,
        media_type="video",
        synthetic_score=0.93,
        decision="flag",
        model_set="ms-it",
        policy_version="policy.v1",
        evidence_uri=f"s3://bucket/evidence/{n:032x}/manifest.json",
        manifest_sha256="ab" * 32,
        segments=[Segment(start_s=1.0, end_s=3.5, score=0.95)],
        submitted_at=1_790_000_000.0,
        detected_at=1_790_000_012.5,
        decided_by=["sbi_face"],
    )


async def _produce(bootstrap: str, topic: str, alerts: list[Alert]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for a in alerts:
            await producer.send_and_wait(
                topic,
                encode(a),
                key=a.alert_id.encode(),
                headers=[("traceparent", TRACEPARENT.encode())],
            )
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, want: int, timeout: float) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(msgs)
    finally:
        await consumer.stop()
    return got


def _wait(predicate: Any, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text()[-3000:]}")


def test_sink_delivers_signed_findings_retries_and_dead_letters_what_is_refused(
    services: Services, tmp_path: Path, receiver: tuple[str, Receiver]
) -> None:
    url, state = receiver
    run = f"sink{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS": services.bootstrap,
            "SYNTHWATCH_KAFKA__APP_ID": f"synthwatch-it-{run}",
            "SYNTHWATCH_KAFKA__PARTITIONS": "1",
            "SYNTHWATCH_KAFKA__TOPIC_REFS": f"{run}.media.refs",
            "SYNTHWATCH_KAFKA__TOPIC_FETCHED": f"{run}.media.fetched",
            "SYNTHWATCH_KAFKA__TOPIC_VERDICTS": f"{run}.media.verdicts",
            "SYNTHWATCH_KAFKA__TOPIC_ALERTS": f"{run}.media.alerts",
            "SYNTHWATCH_KAFKA__TOPIC_DLQ": f"{run}.media.dlq",
            "SYNTHWATCH_KAFKA__TOPIC_RETRY": f"{run}.media.retry",
            "SYNTHWATCH_SINK__URL": url,
            "SYNTHWATCH_SINK__FORMAT": "ocsf",
            "SYNTHWATCH_SINK__SECRET": SECRET,
            "SYNTHWATCH_SINK__MAX_ATTEMPTS": "3",
            "SYNTHWATCH_SINK__BACKOFF_S": "0.1",
            "SYNTHWATCH_SINK__BACKOFF_MAX_S": "0.5",
            "SYNTHWATCH_WEB_PORT": str(port),
            "SYNTHWATCH_LOG_JSON": "true",
        }
    )
    synthwatch(env, "topics", "create")
    alerts = [_alert(n) for n in (1, 2, 3)]
    ok, flaky, refused = (a.alert_id for a in alerts)
    state.flaky.add(flaky)
    state.refused.add(refused)
    asyncio.run(_produce(services.bootstrap, f"{run}.media.alerts", alerts))

    log_path = tmp_path / "sink.log"
    worker = start_worker(env, "sink", log_path)
    try:
        _wait(lambda: {ok, flaky} <= set(state.delivered()), 120, "deliveries", log_path)
        dead = asyncio.run(_read_all(services.bootstrap, f"{run}.media.dlq", 1, 60))
        metrics_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10)

        # The receiver is fixed; the operator replays the sink's dead letters.
        state.refused.clear()
        replay = subprocess.run(
            [sys.executable, "-m", "synthwatch", "dlq", "replay", "--stage", "sink"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replay.returncode == 0, replay.stderr
        _wait(lambda: refused in state.delivered(), 60, "the replayed alert", log_path)
    finally:
        stop_workers(worker)
    assert worker.returncode == 0, log_path.read_text()[-3000:]

    # Every POST is signed over its exact body, and carries the alert id for dedup.
    for headers, body in state.posts:
        assert verify_signature(
            SECRET, headers["x-synthwatch-timestamp"], body, headers["x-synthwatch-signature"]
        )
        assert headers["idempotency-key"] == headers["x-synthwatch-alert-id"]
    findings = state.delivered()
    assert set(findings) == {ok, flaky, refused}
    for alert in alerts:
        finding = findings[alert.alert_id]
        assert finding["class_uid"] == 2004
        assert finding["finding_info"]["uid"] == alert.alert_id
    posts_per_id: dict[str, int] = {}
    for headers, _ in state.posts:
        key = headers["x-synthwatch-alert-id"]
        posts_per_id[key] = posts_per_id.get(key, 0) + 1
    assert posts_per_id[ok] == 1
    assert posts_per_id[flaky] == 2  # a 503, then delivered
    assert posts_per_id[refused] == 2  # 400 is not retried: once, then once more on replay

    (letter,) = [json.loads(m.value) for m in dead]
    assert (letter["stage"], letter["reason"], letter["id"]) == ("sink", "delivery", refused)
    assert SECRET not in letter["error"] and "/siem/ingest" not in letter["error"]
    assert dict(dead[0].headers)["traceparent"].decode().split("-")[1] == TRACEPARENT.split("-")[1]

    assert ready.status_code == 200, ready.text  # the sink needs no S3
    from prometheus_client.parser import text_string_to_metric_families

    counts = {
        s.labels["outcome"]: s.value
        for fam in text_string_to_metric_families(metrics_text)
        for s in fam.samples
        if s.name == "synthwatch_sink_deliveries_total" and s.labels.get("format") == "ocsf"
    }
    assert counts == {"delivered": 2, "retried": 1, "dead_lettered": 1}
    # The endpoint answered the last attempt (a 400 for that alert): it is up.
    assert 'synthwatch_dependency_up{dependency="sink"} 1.0' in metrics_text
