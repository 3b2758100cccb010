"""The streaming pipeline end to end: real Kafka broker, real S3 store, real worker process.

Refs point at media served from 127.0.0.1 (the only address a test may contact; the
worker allows exactly that network). Asserts what an operator of the feed would check:
every ref ends as a verdict or a DLQ record, flagged items have an alert and a complete
evidence bundle whose manifest hashes match, and bad input lands in the DLQ with its
reason.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.media_factory import make_corrupt, make_image, make_video

pytestmark = pytest.mark.shared  # the detectors' weights come from ../shared


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("media")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def _env(services: Services, shared_dir: Path, run: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SYNTHWATCH_MODEL_DIR": str(shared_dir / "weights"),
            "SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS": services.bootstrap,
            "SYNTHWATCH_KAFKA__APP_ID": f"synthwatch-it-{run}",
            "SYNTHWATCH_KAFKA__PARTITIONS": "2",
            "SYNTHWATCH_KAFKA__TOPIC_REFS": f"{run}.media.refs",
            "SYNTHWATCH_KAFKA__TOPIC_FETCHED": f"{run}.media.fetched",
            "SYNTHWATCH_KAFKA__TOPIC_VERDICTS": f"{run}.media.verdicts",
            "SYNTHWATCH_KAFKA__TOPIC_ALERTS": f"{run}.media.alerts",
            "SYNTHWATCH_KAFKA__TOPIC_DLQ": f"{run}.media.dlq",
            "SYNTHWATCH_S3__ENDPOINT_URL": services.s3_endpoint,
            "SYNTHWATCH_S3__ACCESS_KEY_ID": services.access_key,
            "SYNTHWATCH_S3__SECRET_ACCESS_KEY": services.secret_key,
            "SYNTHWATCH_S3__BUCKET": services.bucket,
            # Loopback only, so the test's media server is reachable and nothing else is.
            "SYNTHWATCH_FETCH__ALLOW_NETWORKS": '["127.0.0.0/8"]',
            # Whole-image model on video frames too, so a generated clip without a face
            # still has scored frames to draw evidence from.
            "SYNTHWATCH_MODELS__IMAGE_ON_VIDEO": "true",
            # Flag everything scored, so the evidence path runs on generated media.
            "SYNTHWATCH_POLICY__FLAG_THRESHOLD": "0.0",
            "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": "0.0",
            # Alert ids hash (media, models, policy version): a version per run keeps a
            # store left running by an earlier run from answering with its bundles.
            "SYNTHWATCH_POLICY__VERSION": f"policy-{run}",
            "SYNTHWATCH_SAMPLE__FRAMES": "4",
            "SYNTHWATCH_WEB_PORT": str(port),
            "SYNTHWATCH_LOG_JSON": "true",
        }
    )
    return env


HEADERS = "__headers"
"""Key under which `_collect` keeps each record's Kafka headers."""


def _trace_id(record: dict[str, Any]) -> str:
    """Trace id of a collected record's W3C `traceparent` header (version-traceid-span-flags)."""
    parent = record[HEADERS].get("traceparent", b"").decode()
    assert parent.count("-") == 3, f"no traceparent on {record.get('id')}: {record[HEADERS]}"
    return parent.split("-")[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _collect(
    bootstrap: str, topics: list[str], want: Any, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    got: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, msgs in batch.items():
                got[tp.topic].extend(
                    {**json.loads(m.value), HEADERS: dict(m.headers or ())} for m in msgs
                )
            if want(got) if callable(want) else False:
                break
    finally:
        await consumer.stop()
    return got


def test_refs_end_as_verdicts_alerts_with_evidence_or_dlq_records(
    services: Services, s3_client: Any, shared_dir: Path, media_server: tuple[str, Path]
) -> None:
    base, root = media_server
    make_video(root / "clip.mp4", seconds=2.0, width=320, height=240, faces=True, audio=True)
    make_image(root / "photo.jpg", width=400, height=300)
    make_corrupt(root / "broken.mp4", root / "clip.mp4", keep=0.3)
    (root / "notes.txt").write_text("not media at all\n" * 50)

    run = f"it{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = _env(services, shared_dir, run, port)
    synthwatch(env, "topics", "create")
    refs = {
        "clip": f"{base}/clip.mp4",
        "photo": f"{base}/photo.jpg",
        "broken": f"{base}/broken.mp4",
        "text": f"{base}/notes.txt",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.0.0.7/a.mp4",
        "s3": f"s3://{services.bucket}/inputs/{run}/photo.jpg",
    }
    s3_client.put_object(
        Bucket=services.bucket,
        Key=f"inputs/{run}/photo.jpg",
        Body=(root / "photo.jpg").read_bytes(),
    )

    log_path = root / "worker.log"
    worker = start_worker(env, "all", log_path)
    try:
        # Submitted through the CLI a user would use; it prints "id<TAB>url" per ref.
        sub = synthwatch(env, "submit", *refs.values(), "--source", "it")
        by_url = dict(reversed(line.split("\t", 1)) for line in sub.stdout.splitlines())
        ids = {name: by_url[url] for name, url in refs.items()}

        verdicts_t, dlq_t, alerts_t = (
            f"{run}.media.verdicts",
            f"{run}.media.dlq",
            f"{run}.media.alerts",
        )

        def done(got: dict[str, list[dict[str, Any]]]) -> bool:
            ended = {r["id"] for r in got[verdicts_t]} | {r["id"] for r in got[dlq_t]}
            flagged = {r["id"] for r in got[verdicts_t] if r["decision"] == "flag"}
            alerted = {r["id"] for r in got[alerts_t]}
            return set(ids.values()) <= ended and flagged <= alerted

        refs_t = f"{run}.media.refs"

        def done_with_refs(got: dict[str, list[dict[str, Any]]]) -> bool:
            return done(got) and {r["id"] for r in got[refs_t]} >= set(ids.values())

        got = asyncio.run(
            _collect(services.bootstrap, [refs_t, verdicts_t, dlq_t, alerts_t], done_with_refs, 240)
        )
        metrics_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10)
    finally:
        stop_workers(worker)
    log_text = log_path.read_text(errors="replace")
    assert done(got), f"not every ref ended; worker log tail:\n{log_text[-4000:]}"

    verdicts = {r["id"]: r for r in got[verdicts_t]}
    dlq = {r["id"]: r for r in got[dlq_t]}
    alerts = {r["id"]: r for r in got[alerts_t]}
    # Exactly one ending per ref.
    assert not set(verdicts) & set(dlq)

    for good in ("clip", "photo"):
        v = verdicts[ids[good]]
        assert v["decision"] == "flag"
        assert v["frames"], "sampled frames were scored"
        alert = alerts[ids[good]]
        assert alert["sha256"] == v["sha256"]
        key = alert["evidence_uri"].removeprefix(f"s3://{services.bucket}/")
        manifest_bytes = s3_client.get_object(Bucket=services.bucket, Key=key)["Body"].read()
        assert hashlib.sha256(manifest_bytes).hexdigest() == alert["manifest_sha256"]
        manifest = json.loads(manifest_bytes)
        assert manifest["media_sha256"] == v["sha256"]
        assert {o["role"] for o in manifest["objects"]} >= {"report", "frame"}
        for obj in manifest["objects"]:
            body = s3_client.get_object(Bucket=services.bucket, Key=obj["key"])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == obj["sha256"], obj["key"]
        # A reader checks the signed bundle where it lies, in S3, with the worker's key.
        folder = key.removesuffix("/manifest.json")
        checked = synthwatch(env, "verify", f"s3://{services.bucket}/{folder}", "--json")
        result = json.loads(checked.stdout)
        assert result["verified"] and result["objects"] == len(manifest["objects"])
    assert verdicts[ids["clip"]]["has_audio"] is True
    # The same bytes fetched over s3:// are the same item (same sha256, same blob).
    assert verdicts[ids["s3"]]["sha256"] == verdicts[ids["photo"]]["sha256"]
    assert verdicts[ids["s3"]]["blob"] == verdicts[ids["photo"]]["blob"]

    assert dlq[ids["broken"]]["reason"] == "corrupt_media"
    assert dlq[ids["broken"]]["stage"] == "detect"
    assert dlq[ids["text"]]["reason"] == "unsupported_media"
    for refused in ("metadata", "private"):
        assert dlq[ids[refused]]["reason"] == "refused_address"
        assert dlq[ids[refused]]["stage"] == "fetch"
    assert worker.returncode == 0, log_text[-4000:]

    # One trace per ref, from submit to its verdict, alert or dead letter (W3C trace
    # context in Kafka headers), and the worker's log lines about it carry its trace id.
    submitted = {r["id"]: _trace_id(r) for r in got[refs_t]}
    assert len(set(submitted.values())) == len(ids), "each ref starts its own trace"
    for topic in (verdicts_t, alerts_t, dlq_t):
        for record in got[topic]:
            assert _trace_id(record) == submitted[record["id"]], (topic, record["id"])
    logged = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    verdict_logs = {e.get("id"): e.get("trace_id") for e in logged if e.get("event") == "verdict"}
    assert verdict_logs[ids["clip"]] == submitted[ids["clip"]]

    # The worker's web port serves what an operator scrapes.
    assert ready.status_code == 200 and ready.json()["partitions"] > 0
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(metrics_text))
    _check_documented_metrics(families)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for fam in families for s in fam.samples
    }
    verdict_counts = {
        (labels["media_type"], labels["decision"], labels["model_set"]): value
        for (name, pairs), value in samples.items()
        if name == "synthwatch_verdicts_total" and (labels := dict(pairs))
    }
    model_set = verdicts[ids["photo"]]["model_set"]
    assert verdict_counts[("image", "flag", model_set)] == 2  # the photo, twice
    assert verdict_counts[("video", "flag", model_set)] == 1
    assert samples[("synthwatch_alerts_total", (("decision", "flag"),))] >= 3
    assert samples[("synthwatch_items_total", (("outcome", "ok"), ("stage", "detect")))] == 3
    assert samples[("synthwatch_end_to_end_seconds_count", (("media_type", "image"),))] == 2
    assert samples[("synthwatch_decode_seconds_count", (("media_type", "video"),))] >= 1
    dlq_key = ("synthwatch_dlq_total", (("reason", "refused_address"), ("stage", "fetch")))
    assert samples[dlq_key] == 2
    assert (
        samples[("synthwatch_dlq_total", (("reason", "corrupt_media"), ("stage", "detect")))] == 1
    )
    # Three items were scored; their crops may share batches (that is the batcher's job).
    batch_rows = sum(v for (name, _), v in samples.items() if name == "synthwatch_batch_size_sum")
    assert batch_rows >= 3
    fills = [v for (name, _), v in samples.items() if name == "synthwatch_batch_fill_ratio_count"]
    assert sum(fills) >= 1
    loaded = {
        dict(labels)["model"] for (name, labels) in samples if name == "synthwatch_model_info"
    }
    assert {"sbi_face", "fingerprint"} <= loaded


METRICS_LIST = Path(__file__).resolve().parents[2] / "k8s" / "metrics.txt"


def _check_documented_metrics(families: list[Any]) -> None:
    """The worker serves exactly the metrics k8s/metrics.txt lists (the list the Grafana
    dashboard and docs/OPERATIONS.md are held to), with the listed types and labels."""
    documented: dict[str, tuple[str, set[str]]] = {}
    for line in METRICS_LIST.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            name, kind, *labels = fields
            documented[name] = (kind, set(labels[0].split(",")) if labels else set())
    served = {}
    for fam in families:
        if not fam.name.startswith("synthwatch_"):
            continue
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        labels = {k for smp in fam.samples for k in smp.labels if k != "le"}
        served[name] = (fam.type, labels)
    assert set(served) == set(documented), (
        f"undocumented: {sorted(set(served) - set(documented))}, "
        f"not served: {sorted(set(documented) - set(served))}"
    )
    for name, (kind, labels) in served.items():
        assert kind == documented[name][0], name
        assert not labels or labels == documented[name][1], (name, labels)


def _list_keys(s3_client: Any, bucket: str, prefix: str) -> dict[str, str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_one_process_per_role_and_a_redelivered_verdict_changes_nothing(
    services: Services, s3_client: Any, shared_dir: Path, media_server: tuple[str, Path]
) -> None:
    """fetch, detect and decide as separate processes (as Kubernetes runs them); then the
    verdict is delivered a second time, as after a crash before the offset commit: the
    alert keeps its id and the evidence in S3 is neither duplicated nor overwritten."""
    from aiokafka import AIOKafkaProducer

    base, root = media_server
    make_image(root / "roles.jpg", width=320, height=240)
    run = f"it{uuid.uuid4().hex[:8]}"
    env = _env(services, shared_dir, run, _free_port())
    synthwatch(env, "topics", "create")
    workers: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for role in ("fetch", "detect", "decide"):
        role_env = {**env, "SYNTHWATCH_WEB_PORT": str(_free_port())}
        logs.append(root / f"{run}-{role}.log")
        workers.append(start_worker(role_env, role, logs[-1]))
    verdicts_t, alerts_t = f"{run}.media.verdicts", f"{run}.media.alerts"
    try:
        ref_id = synthwatch(env, "submit", f"{base}/roles.jpg").stdout.split("\t", 1)[0]

        def alerted(n: int) -> Any:
            return lambda got: sum(a["id"] == ref_id for a in got[alerts_t]) >= n

        first = asyncio.run(_collect(services.bootstrap, [verdicts_t, alerts_t], alerted(1), 180))
        assert alerted(1)(first), "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)
        (alert,) = [a for a in first[alerts_t] if a["id"] == ref_id]
        folder = alert["evidence_uri"].removeprefix(f"s3://{services.bucket}/")
        prefix = folder.removesuffix("manifest.json")
        assert prefix.endswith(f"_{alert['alert_id']}/")
        stored = _list_keys(s3_client, services.bucket, prefix)
        assert any(k.endswith("manifest.json") for k in stored)

        (verdict,) = [
            {k: v for k, v in rec.items() if k != HEADERS}
            for rec in first[verdicts_t]
            if rec["id"] == ref_id
        ]

        async def redeliver() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=services.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(
                    verdicts_t, json.dumps(verdict).encode(), key=ref_id.encode()
                )
            finally:
                await producer.stop()

        asyncio.run(redeliver())
        second = asyncio.run(_collect(services.bootstrap, [alerts_t], alerted(2), 120))
    finally:
        stop_workers(*workers)
    again = [a for a in second[alerts_t] if a["id"] == ref_id]
    assert len(again) == 2
    assert again[0]["alert_id"] == again[1]["alert_id"]
    assert again[0]["manifest_sha256"] == again[1]["manifest_sha256"]
    assert _list_keys(s3_client, services.bucket, prefix) == stored
    assert [w.returncode for w in workers] == [0, 0, 0]
