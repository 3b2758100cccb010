"""A slow origin must not hold up the refs behind it (kafka.fetch_concurrency).

A fetch worker against the real broker and store; the media server answers one path
only after a delay, as a congested origin does. A ref submitted after the slow one is
fetched, stored and forwarded while the slow download is still waiting.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Services, start_worker, stop_workers, synthwatch
from tests.integration.test_pipeline import _collect, _env, _free_port
from tests.media_factory import make_image

SLOW_S = 8.0


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[str, Path, threading.Event]]:
    """Serves tmp_path; `/slow-*` answers after SLOW_S seconds, unless released early."""
    release = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self) -> None:
            if self.path.startswith("/slow-"):
                release.wait(SLOW_S)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path, release
    finally:
        release.set()
        server.shutdown()


def test_a_slow_origin_does_not_hold_up_the_refs_behind_it(
    services: Services, origin: tuple[str, Path, threading.Event], tmp_path: Path
) -> None:
    base, root, release = origin
    make_image(root / "slow-a.jpg", width=96, height=64)
    make_image(root / "fast-b.png", width=96, height=64, fmt="PNG")
    run = f"it{uuid.uuid4().hex[:8]}"
    env = _env(services, tmp_path / "no-models", run, _free_port())
    synthwatch(env, "topics", "create")
    log = tmp_path / "fetch.log"
    worker = start_worker(env, "fetch", log)
    fetched_t = f"{run}.media.fetched"
    try:

        def submit(url: str) -> str:
            return synthwatch(env, "submit", url).stdout.split("\t", 1)[0]

        def fetched_ids(until: str, timeout: float) -> list[str]:
            """Ids on media.fetched once `until` is among them, or at `timeout`."""
            got = asyncio.run(
                _collect(
                    services.bootstrap,
                    [fetched_t],
                    lambda g: any(r["id"] == until for r in g[fetched_t]),
                    timeout,
                )
            )
            return [r["id"] for r in got[fetched_t]]

        # Warm: the worker has joined its group and fetched once before the timing.
        warm = submit(f"{base}/fast-b.png")
        assert warm in fetched_ids(warm, 120), log.read_text(errors="replace")

        slow = submit(f"{base}/slow-a.jpg")
        t0 = time.monotonic()
        fast = submit(f"{base}/fast-b.png")
        ids = fetched_ids(fast, SLOW_S - 1.0)
        fast_after = time.monotonic() - t0
        assert fast in ids, f"the second ref waited for the slow origin ({fast_after:.1f} s)"
        assert slow not in ids  # still waiting on its origin
        release.set()
        assert slow in fetched_ids(slow, 60)  # and it still arrives
    finally:
        stop_workers(worker)
    assert worker.returncode == 0, log.read_text(errors="replace")[-3000:]
