"""`synthwatch rescan --cluster` against the real pipeline: real Kafka, real S3, a real
worker process.

An item is scanned and flagged under one policy; the worker is restarted with a policy
under which the same score passes; `rescan --cluster --from-topic` sends the stored blob
through the pipeline again. What an operator checks: the diff reports the flip, and
the alerts topic carries a new alert for the item with the new decision and the re-scan
marker (a `pass` that withdraws the earlier `flag`), with its own signed evidence bundle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.integration.test_pipeline import _env as pipeline_env
from tests.integration.test_pipeline import _free_port, media_server
from tests.media_factory import make_image

pytestmark = pytest.mark.shared  # the detectors' weights come from ../shared


__all__ = ["media_server"]  # the fixture, imported for this module's tests


def _env(services: Services, shared_dir: Path, run: str, *, threshold: float) -> dict[str, str]:
    """A worker's settings (the pipeline test's); `threshold` is both policy thresholds,
    and the policy's version says which, so each policy's alerts have ids of their own."""
    env = pipeline_env(services, shared_dir, run, _free_port())
    env.update(
        {
            "SYNTHWATCH_POLICY__FLAG_THRESHOLD": str(threshold),
            "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": str(threshold),
            "SYNTHWATCH_POLICY__VERSION": f"policy-{run}-{threshold}",
        }
    )
    return env


async def _collect(
    bootstrap: str, topic: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """The topic's records from its beginning, until `done(records)` or `timeout`."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(got):
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                got.extend(json.loads(m.value) for m in msgs)
    finally:
        await consumer.stop()
    return got


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def test_a_rescan_under_a_new_policy_re_emits_the_flipped_items_alert(
    services: Services, s3_client: Any, shared_dir: Path, media_server: tuple[str, Path]
) -> None:
    base, root = media_server
    make_image(root / "photo.jpg", width=400, height=300)
    run = f"it{uuid.uuid4().hex[:8]}"
    alerts_t, verdicts_t = f"{run}.media.alerts", f"{run}.media.verdicts"
    flag_all = _env(services, shared_dir, run, threshold=0.0)  # every score flags
    pass_all = _env(services, shared_dir, run, threshold=1.0)  # only a certain fake flags
    synthwatch(flag_all, "topics", "create")

    first_log = root / "worker-flag.log"
    worker = start_worker(flag_all, "all", first_log)
    try:
        ref_id = synthwatch(flag_all, "submit", f"{base}/photo.jpg", "--source", "it").stdout
        ref_id = ref_id.split("\t", 1)[0]
        first = asyncio.run(
            _collect(
                services.bootstrap, alerts_t, lambda got: any(a["id"] == ref_id for a in got), 180
            )
        )
    finally:
        stop_workers(worker)
    assert first, f"no alert for the first scan; worker log:\n{_log_tail(first_log)}"
    (flag_alert,) = first
    assert flag_alert["decision"] == "flag" and flag_alert.get("rescan") is None

    second_log = root / "worker-pass.log"
    worker = start_worker(pass_all, "all", second_log)
    diff_path = root / "diff.json"
    try:
        proc = synthwatch(
            pass_all,
            "rescan",
            "--cluster",
            "--from-topic",
            "--out",
            str(diff_path),
            "--timeout",
            "180",
            timeout=300,
        )
        alerts = asyncio.run(
            _collect(
                services.bootstrap,
                alerts_t,
                lambda got: sum(a["id"] == ref_id for a in got) >= 2,
                60,
            )
        )
        verdicts = asyncio.run(
            _collect(
                services.bootstrap,
                verdicts_t,
                lambda got: sum(v["id"] == ref_id for v in got) >= 2,
                30,
            )
        )
    finally:
        stop_workers(worker)
    log = _log_tail(second_log)

    # The diff names the flip, and why: the policy changed, the models did not.
    diff = json.loads(diff_path.read_text())
    assert diff["mode"] == "cluster" and diff["summary"]["flipped"] == 1, (diff, log)
    assert diff["summary"]["transitions"] == {"flag -> pass": 1}
    (item,) = diff["items"]
    assert item["id"] == ref_id and item["status"] == "rescanned"
    assert (item["previous_decision"], item["decision"]) == ("flag", "pass")
    assert item["policy_version"] == {
        "before": f"policy-{run}-0.0",
        "after": f"policy-{run}-1.0",
    }
    assert item["model_set"]["before"] == item["model_set"]["after"]
    assert item["score"] == pytest.approx(item["previous_score"], abs=1e-6)
    assert "flag -> pass" in proc.stdout and "photo.jpg" in proc.stdout

    # The pipeline's new verdict carries the marker; its alert withdraws the flag.
    (rescanned,) = [v for v in verdicts if v["id"] == ref_id and v.get("rescan")]
    assert rescanned["rescan"]["run"] == diff["run"]
    again = [a for a in alerts if a["id"] == ref_id]
    assert len(again) == 2, log
    withdrawn = again[1]
    assert withdrawn["decision"] == "pass"
    assert withdrawn["rescan"]["run"] == diff["run"]
    assert withdrawn["rescan"]["previous_decision"] == "flag"
    assert withdrawn["rescan"]["previous_policy_version"] == f"policy-{run}-0.0"
    assert withdrawn["alert_id"] != flag_alert["alert_id"]
    assert withdrawn["sha256"] == flag_alert["sha256"]
    # Its evidence bundle is in the bucket, complete, and says what the re-scan decided.
    key = withdrawn["evidence_uri"].removeprefix(f"s3://{services.bucket}/")
    manifest = s3_client.get_object(Bucket=services.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(manifest).hexdigest() == withdrawn["manifest_sha256"]
    objects = json.loads(manifest)["objects"]
    (report,) = [o for o in objects if o["name"] == "report.json"]
    body = s3_client.get_object(Bucket=services.bucket, Key=report["key"])["Body"].read()
    shown = json.loads(body)["verdict"]
    assert shown["decision"] == "pass" and shown["rescan"]["previous_decision"] == "flag"
