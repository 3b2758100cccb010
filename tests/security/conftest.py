"""Fixtures for the network half of the hostile-input suite (test_ssrf.py, test_bodies.py).

All opt-in: a test that names none of them runs on the ordinary network stack. What each
fixture guarantees is described in `tests/security/netharness.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.security.netharness import HttpServer, Listener, SealedNet


@pytest.fixture
def sealed_net(monkeypatch: pytest.MonkeyPatch) -> SealedNet:
    """Connects and lookups recorded, nothing past loopback (stand-ins served locally)."""
    net = SealedNet()
    net.install(monkeypatch)
    return net


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A 127.0.0.1 TCP listener that counts arrivals and never answers."""
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A raw threaded HTTP server on 127.0.0.1; fill `.routes` with path -> route."""
    srv = HttpServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        thread.join()
