"""Lists of known media in the streaming pipeline: an update reaches a running worker.

A real broker, store and worker process (`matching.lists=kafka`). A fake is listed
with `synthwatch hashes add --cluster` after the worker has started; its re-encoded
copy, submitted next, is flagged by the match alone. The entry is then removed
(a tombstone on the compacted topic) and the same copy, submitted again, is not.
No restart in between: the worker follows the topic.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.integration.test_pipeline import _collect, _env, _free_port, media_server

pytestmark = pytest.mark.shared  # the detectors' weights come from ../shared

__all__ = ["media_server"]  # the fixture, imported for this module's tests


def _entries_loaded(port: int) -> float | None:
    """The worker's `synthwatch_hashlist_entries` gauge, or None before it serves one."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("synthwatch_hashlist_entries{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_for_entries(
    worker: subprocess.Popen[bytes], port: int, want: float, log_path: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if _entries_loaded(port) == want:
            return
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"worker never had {want} list entries; log tail:\n{tail}")


def test_a_list_update_reaches_a_running_worker(
    services: Services, shared_dir: Path, media_server: tuple[str, Path]
) -> None:
    base, root = media_server
    original = shared_dir / "media" / "dev" / "images" / "fake" / "declan_A3.jpg"
    copy = root / "reupload.jpg"
    with Image.open(original) as im:
        im.convert("RGB").resize((768, 576)).save(copy, quality=70)

    run = f"it{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = _env(services, shared_dir, run, port)
    env.update(
        {
            "SYNTHWATCH_MATCHING__LISTS": "kafka",
            "SYNTHWATCH_KAFKA__TOPIC_HASHLISTS": f"{run}.media.hashlists",
            # Nothing is flagged on its score: a flag here is the match's alone.
            "SYNTHWATCH_POLICY__FLAG_THRESHOLD": "1.0",
            "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": "1.0",
        }
    )
    synthwatch(env, "topics", "create")
    log_path = root / f"worker-{run}.log"
    worker = start_worker(env, "all", log_path)
    verdicts_t = f"{run}.media.verdicts"
    try:
        _wait_for_entries(worker, port, 0, log_path)
        added = synthwatch(
            env, "hashes", "add", str(original), "--list", "desk", "--id", "case-17",
            "--reference", "https://factcheck.example/case-17", "--cluster",
        )  # fmt: skip
        assert "case-17" in added.stdout
        _wait_for_entries(worker, port, 1, log_path)
        first = synthwatch(env, "submit", f"{base}/reupload.jpg", "--source", "it")
        first_id = first.stdout.split("\t")[0]

        def has(ids: set[str]) -> Any:
            return lambda got: ids <= {r["id"] for r in got[verdicts_t]}

        got = asyncio.run(_collect(services.bootstrap, [verdicts_t], has({first_id}), 180))
        flagged = {r["id"]: r for r in got[verdicts_t]}[first_id]

        synthwatch(env, "hashes", "remove", "--list", "desk", "case-17", "--cluster")
        _wait_for_entries(worker, port, 0, log_path)
        second = synthwatch(env, "submit", f"{base}/reupload.jpg", "--source", "it")
        second_id = second.stdout.split("\t")[0]
        got = asyncio.run(_collect(services.bootstrap, [verdicts_t], has({second_id}), 180))
        cleared = {r["id"]: r for r in got[verdicts_t]}[second_id]
        listed = synthwatch(env, "hashes", "list", "--cluster", "--json")
    finally:
        stop_workers(worker)

    assert flagged["decision"] == "flag" and flagged["decided_by"] == ["match"]
    (match,) = flagged["matches"]
    assert (match["list"], match["entry"], match["label"]) == ("desk", "case-17", "fake")
    assert match["reference"] == "https://factcheck.example/case-17"
    assert cleared["matches"] == [] and cleared["decision"] != "flag"
    assert listed.stdout.strip() == "[]"
