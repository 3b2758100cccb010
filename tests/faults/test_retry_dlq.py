"""Poison records, transient failures through the retry topic, and `synthwatch dlq replay`."""

from __future__ import annotations

import http.server
import io
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from synthwatch.schemas import MediaRef, encode
from tests.faults.conftest import Run


def test_poison_records_go_to_the_dlq_with_their_reason_and_the_partition_moves_on(
    run: Run,
) -> None:
    worker = run.start_worker()
    poison: list[tuple[str, bytes | None]] = [
        ("refs", b"{not json"),
        ("refs", b'{"kind": "something.else.v9", "x": 1}'),
        ("refs", None),  # a tombstone: null value
        ("fetched", b"[1, 2, 3]"),
        ("verdicts", b'{"id": "only-an-id"}'),
    ]
    for i, (what, value) in enumerate(poison):
        run.produce(what, value, key=f"poison-{i}".encode(), partition=0)
    (url,) = run.images(1)
    good = MediaRef(id="good-after-poison", url=url, source="faults", submitted_at=time.time())
    run.produce("refs", encode(good), key=good.id.encode(), partition=0)

    ledger = run.collect(
        lambda led: len(led.dlq) >= len(poison) and "good-after-poison" in led.ended(),
        timeout=120,
    )
    worker.terminate()
    by_id = {r["id"]: r for r in ledger.dlq}
    assert {f"poison-{i}" for i in range(len(poison))} <= set(by_id), ledger.dlq
    for i, (what, value) in enumerate(poison):
        letter = by_id[f"poison-{i}"]
        assert letter["reason"] == "schema", letter
        assert letter["stage"] == {"refs": "fetch", "fetched": "detect", "verdicts": "decide"}[what]
        assert letter["topic"] == run.topic(what) and letter["partition"] == 0
        assert letter["original"] == (value or b"").decode()
    # (The poison record produced onto the verdicts topic is read back as one, too.)
    scored = [v["id"] for v in ledger.verdicts if "decision" in v]
    assert scored == ["good-after-poison"]


class _Origin:
    """A media origin on 127.0.0.1 that fails on purpose: /flaky/<n>/x.jpg answers 503
    n times, then the image; /down/x.jpg answers 503 until `healed`."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.healed = False
        noise = np.random.default_rng(7).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="JPEG", quality=90)
        self.image = buf.getvalue()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.hits[self.path] += 1
                parts = self.path.strip("/").split("/")
                failing = (parts[0] == "flaky" and origin.hits[self.path] <= int(parts[1])) or (
                    parts[0] == "down" and not origin.healed
                )
                if failing:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(origin.image)))
                self.end_headers()
                self.wfile.write(origin.image)

            def log_message(self, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def origin() -> Iterator[_Origin]:
    o = _Origin()
    yield o
    o.server.shutdown()


def test_transient_failures_go_round_the_retry_topic_then_to_the_dlq_and_replay_heals(
    run: Run, origin: _Origin
) -> None:
    run.extra.update(
        {
            "SYNTHWATCH_RETRY__INLINE_ATTEMPTS": "2",
            "SYNTHWATCH_RETRY__TOPIC_ATTEMPTS": "2",
            "SYNTHWATCH_RETRY__TOPIC_BACKOFF_S": "0.5",
        }
    )
    worker = run.start_worker()
    # 3 failures: 2 in place, then 1 more on the first retry-topic round, then success.
    flaky = f"{origin.base}/flaky/3/{run.name}.jpg"
    down = f"{origin.base}/down/{run.name}.jpg"
    ids = run.submit([flaky, down])
    flaky_id = next(i for i, u in ids.items() if u == flaky)
    down_id = next(i for i, u in ids.items() if u == down)

    ledger = run.collect(lambda led: {flaky_id, down_id} <= led.ended(), timeout=120)
    assert flaky_id in {v["id"] for v in ledger.verdicts}
    assert origin.hits[f"/flaky/3/{run.name}.jpg"] == 4
    (letter,) = [d for d in ledger.dlq if d["id"] == down_id]
    assert letter["reason"] == "fetch_failed" and letter["stage"] == "fetch"
    assert letter["attempt"] == 2 and "gave up after 3 rounds" in letter["error"]
    # 2 in place, times the first delivery and 2 retry-topic rounds.
    assert origin.hits[f"/down/{run.name}.jpg"] == 6
    assert flaky_id not in {d["id"] for d in ledger.dlq}

    # The origin is fixed; an operator replays what failed for that reason.
    origin.healed = True
    dry = run.cli("dlq", "replay", "--reason", "fetch_failed", "--dry-run")
    assert f"would replay\t{down_id}\tfetch\tfetch_failed" in dry.stdout
    replay = run.cli("dlq", "replay", "--reason", "fetch_failed", "--id", down_id)
    assert replay.stdout.count("replayed\t") == 1, replay.stdout
    healed = run.collect(lambda led: down_id in {v["id"] for v in led.verdicts}, timeout=120)
    assert down_id in {v["id"] for v in healed.verdicts}
    worker.terminate()


def test_dlq_replay_says_clearly_when_the_broker_is_not_there() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "synthwatch", "dlq", "replay"],
        env={"PATH": "/usr/bin:/bin", "SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot reach Kafka at 127.0.0.1:1" in proc.stderr
