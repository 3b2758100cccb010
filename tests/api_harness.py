"""What the API tests share: settings that scan with synthwatch's own shipped model only
(no ../shared needed), a started `ScanService`, and a small HTTP server on 127.0.0.1
that serves media and records what is POSTed to it (callbacks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from synthwatch.operators.fetch import FetchSettings
from synthwatch.operators.signing import Signer
from synthwatch.pipeline.engine import Engine
from synthwatch.pipeline.scans import ScanService
from synthwatch.pipeline.settings import ApiSettings, ModelSettings, Settings

KEY = "desk-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
KEYS = {"desk": KEY, "other": OTHER_KEY}
AUTH = {"X-API-Key": KEY}


def api_settings(tmp: Path, *, allow_private: bool = True, **api: Any) -> Settings:
    """Scans with `fingerprint` alone (shipped in the package), fetches from loopback
    when `allow_private` (the tests' own servers), keeps its data under `tmp`."""
    api.setdefault("keys", {name: SecretStr(key) for name, key in KEYS.items()})
    return Settings(
        model_dir=tmp / "no-third-party-weights",
        models=ModelSettings(face_models=(), image_models=("fingerprint",), audio_models=()),
        fetch=FetchSettings(allow_private=allow_private),
        api=ApiSettings(data_dir=tmp / "api", **api),
    )


def lean_engine(tmp: Path) -> Engine:
    return Engine(api_settings(tmp))


@contextmanager
def running_service(settings: Settings, engine: Engine) -> Iterator[ScanService]:
    service = ScanService(settings, engine=engine, signer=Signer.generate())
    service.start()
    try:
        yield service
    finally:
        service.close()


def wait_finished(client: Any, scan_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    """The scan record once it is `done` or `error` (through the API)."""
    deadline = time.monotonic() + timeout_s
    while True:
        record: dict[str, Any] = client.get(f"/v1/scans/{scan_id}", headers=AUTH).json()
        if record["status"] in ("done", "error"):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"scan {scan_id} still {record['status']} after {timeout_s} s")
        time.sleep(0.1)


class LocalServer:
    """Serves `files` (path -> bytes) on GET and records every POST (path, headers, body)."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = files or {}
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.posted = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = owner.files.get(self.path.split("?", 1)[0])
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                owner.posts.append((self.path, dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()
                owner.posted.set()

            def log_message(self, *_args: object) -> None:
                """Quiet: the test output is about the API, not this server's requests."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
