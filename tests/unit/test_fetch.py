"""Fetcher: SSRF guard at connect time, redirects, byte and time caps, errors, s3 and local refs.

Safety: the only real server is an `http.server` on 127.0.0.1. Every test runs with
`socket.socket.connect` wrapped so that any attempt to reach a non-loopback address is
recorded and refused locally; a broken guard therefore fails a test instead of sending
traffic off this machine.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import pytest
from botocore.exceptions import ClientError

from synthwatch.errors import (
    FetchFailed,
    FetchTimeout,
    InvalidRef,
    RefusedAddress,
    TooLarge,
    UnsupportedMedia,
)
from synthwatch.operators import netguard
from synthwatch.operators.fetch import Fetched, Fetcher, FetchSettings

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 20
PUBLIC_IP = "93.184.216.34"

Route = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.connections = 0
        self.hosts: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        self.connections += 1
        return conn

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        # OSError: the client hung up, as the fetcher does on every refusal.
        with contextlib.suppress(OSError):
            route(self)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test server's access log out of the test output."""


def _body(data: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for name, value in (headers or {"Content-Length": str(len(data))}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    return route


def _redirect(location: str, status: int = 302) -> Route:
    return _body(b"", status=status, headers={"Location": location, "Content-Length": "0"})


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def offbox_connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connect to a non-loopback address, refused locally instead of made."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if host is None or not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            attempts.append(address)
            raise ConnectionRefusedError(f"test harness refused connect to {address!r}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        try:
            connect(self, address)
        except OSError as exc:
            return exc.errno or 1
        return 0

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


def _fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: list[str]) -> list[str]:
    """Make getaddrinfo answer each call with the next list of addresses (the last repeats)."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        addresses = answers[min(len(calls), len(answers)) - 1]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, int(port)),
            )
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def _fetcher(**settings: Any) -> Fetcher:
    return Fetcher(FetchSettings(**settings), embedded=False)


def _leftovers(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


# --- connect-time guard ------------------------------------------------------------------


def test_loopback_url_is_refused_by_default_and_never_connected(
    server: _Server, tmp_path: Path
) -> None:
    server.routes["/x"] = _body(PNG)
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(server.url("/x"), tmp_path)
    assert "127.0.0.1 is a loopback address" in str(info.value)
    assert "SYNTHWATCH_FETCH__ALLOW_PRIVATE=true" in str(info.value)
    assert server.connections == 0
    assert _leftovers(tmp_path) == []


def test_backend_refuses_loopback_even_without_the_url_precheck(server: _Server) -> None:
    # The guarded client alone (no check_url) must refuse: the backend is the real guard.
    with netguard.guarded_client() as client, pytest.raises(RefusedAddress):
        client.get(server.url("/x"))
    assert server.connections == 0


def test_name_resolving_to_loopback_is_refused_at_connect_time(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, ["127.0.0.1"])
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(f"http://media.example:{server.port}/x", tmp_path)
    assert "media.example resolves to 127.0.0.1, a loopback address" in str(info.value)
    assert server.connections == 0


def test_allowed_private_fetch_downloads_hashes_and_sniffs(server: _Server, tmp_path: Path) -> None:
    server.routes["/x"] = _body(PNG)
    with _fetcher(allow_private=True) as f:
        got = f.fetch(server.url("/x"), tmp_path)
    digest = hashlib.sha256(PNG).hexdigest()
    assert got == Fetched(
        path=tmp_path / f"{digest}.png",
        sha256=digest,
        size=len(PNG),
        mime="image/png",
        media_type="image",
        url=server.url("/x"),
    )
    assert got.path.read_bytes() == PNG
    assert _leftovers(tmp_path) == [got.path]


def test_dns_rebinding_cannot_redirect_the_vetted_connect(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offbox_connects: list[Any]
) -> None:
    # First answer public, every later answer loopback: the classic rebinding setup.
    calls = _fake_dns(monkeypatch, [PUBLIC_IP], ["127.0.0.1"])
    url = f"http://rebind.example:{server.port}/x"
    with _fetcher() as f:
        # The name is resolved once and the socket goes to that vetted literal; the second,
        # rebinding answer is never consulted for this connect (the harness refuses it).
        with pytest.raises(FetchFailed) as info:
            f.fetch(url, tmp_path)
        assert not info.value.permanent
        assert calls == ["rebind.example"]
        assert offbox_connects == [(PUBLIC_IP, server.port)]
        # The next connect sees the rebinding answer and refuses before any socket.
        with pytest.raises(RefusedAddress, match=r"rebind\.example resolves to 127\.0\.0\.1"):
            f.fetch(url, tmp_path)
    assert offbox_connects == [(PUBLIC_IP, server.port)]
    assert server.connections == 0
    assert _leftovers(tmp_path) == []


def test_only_allowed_answers_of_a_mixed_resolution_are_tried(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offbox_connects: list[Any]
) -> None:
    _fake_dns(monkeypatch, ["127.0.0.1", "10.0.0.1", PUBLIC_IP])
    with _fetcher() as f, pytest.raises(FetchFailed):
        f.fetch(f"http://mixed.example:{server.port}/x", tmp_path)
    assert offbox_connects == [(PUBLIC_IP, server.port)]
    assert server.connections == 0


def test_host_header_and_tls_server_name_stay_the_hostname(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/x"] = _body(PNG)
    _fake_dns(monkeypatch, ["127.0.0.1"])
    with _fetcher(allow_private=True) as f:
        f.fetch(f"http://media.example:{server.port}/x", tmp_path)
    assert server.hosts == [f"media.example:{server.port}"]

    server_names: list[str | None] = []

    def start_tls(self: Any, ssl_context: Any, server_hostname: str | None = None, **_: Any) -> Any:
        server_names.append(server_hostname)
        self.close()
        raise httpcore.ConnectError("handshake intercepted by the test")

    monkeypatch.setattr(netguard.GuardedStream, "start_tls", start_tls)
    with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed):
        f.fetch(f"https://media.example:{server.port}/x", tmp_path)
    assert server_names == ["media.example"]


# --- redirects ---------------------------------------------------------------------------


@pytest.fixture
def loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard in which 127.0.0.0/8 is allowed and everything else keeps its real verdict."""
    real = netguard.classify

    def classify(ip: netguard.IPAddress) -> str | None:
        loopback = ip.is_loopback and not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped)
        return None if loopback else real(ip)

    monkeypatch.setattr(netguard, "classify", classify)


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_redirects_are_followed_and_the_final_url_reported(server: _Server, tmp_path: Path) -> None:
    server.routes["/a"] = _redirect("/b", 301)
    server.routes["/b"] = _redirect(server.url("/c"), 307)
    server.routes["/c"] = _body(PNG)
    with _fetcher() as f:
        got = f.fetch(server.url("/a"), tmp_path)
    assert got.url == server.url("/c")
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()


@pytest.mark.usefixtures("loopback_counts_as_public")
@pytest.mark.parametrize(
    "target", ["http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/", "http://[fd00::1]/"]
)
def test_redirect_to_a_private_literal_is_refused_before_connecting(
    server: _Server, tmp_path: Path, target: str, offbox_connects: list[Any]
) -> None:
    server.routes["/a"] = _redirect(target)
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(server.url("/a"), tmp_path)
    assert f"(redirected from {server.url('/a')})" in str(info.value)
    assert offbox_connects == []
    assert server.connections == 1


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_redirect_to_a_name_resolving_private_is_refused_at_connect(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offbox_connects: list[Any]
) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "internal.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    server.routes["/a"] = _redirect("http://internal.example/secrets")
    with (
        _fetcher() as f,
        pytest.raises(RefusedAddress, match=r"resolves to 10\.0\.0\.1, a private.*redirected from"),
    ):
        f.fetch(server.url("/a"), tmp_path)
    assert offbox_connects == []


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "s3://bucket/key"]
)
def test_redirect_to_another_scheme_is_refused(
    server: _Server, tmp_path: Path, target: str
) -> None:
    server.routes["/a"] = _redirect(target)
    with _fetcher(allow_private=True) as f, pytest.raises(InvalidRef, match="is not fetched"):
        f.fetch(server.url("/a"), tmp_path)


def test_redirect_loop_stops_after_max_redirects(server: _Server, tmp_path: Path) -> None:
    server.routes["/a"] = _redirect("/b")
    server.routes["/b"] = _redirect("/a")
    with _fetcher(allow_private=True, max_redirects=3) as f, pytest.raises(FetchFailed) as info:
        f.fetch(server.url("/a"), tmp_path)
    assert "more than 3 redirects" in str(info.value)
    assert info.value.permanent
    assert len(server.hosts) == 4


# --- caps ----------------------------------------------------------------------------------


def test_body_over_the_cap_is_too_large_and_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    body = PNG + b"\0" * 200_000
    # No Content-Length: the cap must be hit while streaming, not from the header.
    server.routes["/x"] = _body(body, headers={"Connection": "close"})
    with _fetcher(allow_private=True, max_bytes=100_000) as f, pytest.raises(TooLarge):
        f.fetch(server.url("/x"), tmp_path)
    assert _leftovers(tmp_path) == []


def test_declared_length_over_the_cap_is_refused_before_the_body(
    server: _Server, tmp_path: Path
) -> None:
    server.routes["/x"] = _body(PNG, headers={"Content-Length": "10000000000"})
    with (
        _fetcher(allow_private=True, max_bytes=100_000) as f,
        pytest.raises(TooLarge, match="declares 10000000000 bytes"),
    ):
        f.fetch(server.url("/x"), tmp_path)
    assert _leftovers(tmp_path) == []


def test_gzip_bomb_is_capped_on_decoded_bytes(server: _Server, tmp_path: Path) -> None:
    bomb = gzip.compress(PNG + b"\0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 100_000  # the wire size is honest and far under the cap
    server.routes["/x"] = _body(
        bomb, headers={"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}
    )
    with _fetcher(allow_private=True, max_bytes=1_000_000) as f, pytest.raises(TooLarge):
        f.fetch(server.url("/x"), tmp_path)
    assert _leftovers(tmp_path) == []


def test_stacked_content_encodings_are_refused(server: _Server, tmp_path: Path) -> None:
    doubled = gzip.compress(gzip.compress(PNG))
    server.routes["/x"] = _body(
        doubled, headers={"Content-Encoding": "gzip, gzip", "Content-Length": str(len(doubled))}
    )
    with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed, match="Content-Encoding"):
        f.fetch(server.url("/x"), tmp_path)


def test_content_length_longer_than_the_body_is_a_broken_transfer(
    server: _Server, tmp_path: Path
) -> None:
    server.routes["/x"] = _body(PNG, headers={"Content-Length": str(len(PNG) + 1000)})
    with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed) as info:
        f.fetch(server.url("/x"), tmp_path)
    assert not info.value.permanent
    assert _leftovers(tmp_path) == []


def test_content_length_shorter_than_the_body_only_yields_the_declared_bytes(
    server: _Server, tmp_path: Path
) -> None:
    server.routes["/x"] = _body(PNG + b"trailing junk", headers={"Content-Length": str(len(PNG))})
    with _fetcher(allow_private=True) as f:
        got = f.fetch(server.url("/x"), tmp_path)
    assert got.size == len(PNG)


def _drip(interval: float, head: bytes = PNG[:16]) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
        for _ in range(200):
            time.sleep(interval)
            h.wfile.write(b"\0")
            h.wfile.flush()

    return route


def test_slow_drip_is_cut_at_the_total_budget(server: _Server, tmp_path: Path) -> None:
    # Each byte arrives well within any per-read timeout; only the total budget stops it.
    server.routes["/x"] = _drip(0.02)
    started = time.monotonic()
    with _fetcher(allow_private=True, timeout_s=0.5) as f, pytest.raises(FetchTimeout):
        f.fetch(server.url("/x"), tmp_path)
    assert time.monotonic() - started < 1.5
    assert _leftovers(tmp_path) == []


def test_drip_that_decodes_to_nothing_is_cut_at_the_total_budget(
    server: _Server, tmp_path: Path
) -> None:
    # Empty deflate blocks keep the socket busy but never yield a decoded chunk, so no
    # check between chunks can run; only the per-read clamp to the deadline stops this.
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    empty_block = b"\x00\x00\x00\xff\xff"

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.end_headers()
        h.wfile.write(gzip_header)
        for _ in range(200):
            h.wfile.write(empty_block)
            h.wfile.flush()
            time.sleep(0.02)

    server.routes["/x"] = route
    started = time.monotonic()
    with _fetcher(allow_private=True, timeout_s=0.5) as f, pytest.raises(FetchTimeout):
        f.fetch(server.url("/x"), tmp_path)
    assert time.monotonic() - started < 1.5
    assert _leftovers(tmp_path) == []


def test_stalled_body_times_out_at_the_budget(server: _Server, tmp_path: Path) -> None:
    server.routes["/x"] = _drip(5.0)
    started = time.monotonic()
    with _fetcher(allow_private=True, timeout_s=0.4) as f, pytest.raises(FetchTimeout):
        f.fetch(server.url("/x"), tmp_path)
    assert time.monotonic() - started < 1.4


def test_endless_body_is_too_large(server: _Server, tmp_path: Path) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        h.wfile.write(PNG)
        while True:
            h.wfile.write(b"\0" * 65536)

    server.routes["/x"] = endless
    with _fetcher(allow_private=True, max_bytes=2_000_000) as f, pytest.raises(TooLarge):
        f.fetch(server.url("/x"), tmp_path)
    assert _leftovers(tmp_path) == []


def test_non_media_is_rejected_after_the_first_bytes(server: _Server, tmp_path: Path) -> None:
    server.routes["/x"] = _body(b"<html>" + b"x" * 5000, headers={"Connection": "close"})
    with _fetcher(allow_private=True) as f, pytest.raises(UnsupportedMedia):
        f.fetch(server.url("/x"), tmp_path)
    assert _leftovers(tmp_path) == []


# --- HTTP errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"), [(404, False), (403, False), (408, True), (429, True), (503, True)]
)
def test_http_errors_say_whether_a_retry_can_help(
    server: _Server, tmp_path: Path, status: int, transient: bool
) -> None:
    server.routes["/x"] = _body(b"nope", status=status)
    with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed) as info:
        f.fetch(server.url("/x"), tmp_path)
    assert info.value.permanent is not transient
    assert f"HTTP {status}" in str(info.value)


def test_messages_never_show_signatures(server: _Server, tmp_path: Path) -> None:
    url = server.url("/x") + "?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAXYZ"
    with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed) as info:
        f.fetch(url, tmp_path)
    assert "deadbeef" not in str(info.value)
    assert "AKIAXYZ" not in str(info.value)


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connects are refused
        with _fetcher(allow_private=True) as f, pytest.raises(FetchFailed) as info:
            f.fetch(f"http://127.0.0.1:{port}/x", tmp_path)
    assert not info.value.permanent


# --- other schemes -------------------------------------------------------------------------


def test_local_path_is_refused_outside_embedded_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    with _fetcher() as f:
        for ref in (str(path), path.as_uri()):
            with pytest.raises(InvalidRef, match="embedded mode"):
                f.fetch(ref, tmp_path / "out")


def test_local_path_is_hashed_in_place_in_embedded_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    with Fetcher(FetchSettings(), embedded=True) as f:
        by_path = f.fetch(str(path), tmp_path / "out")
        by_uri = f.fetch(path.as_uri(), tmp_path / "out")
    assert by_path == by_uri
    assert by_path.path == path
    assert by_path.sha256 == hashlib.sha256(PNG).hexdigest()
    assert not (tmp_path / "out").exists()


def test_local_directory_and_oversized_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    with Fetcher(FetchSettings(max_bytes=100), embedded=True) as f:
        with pytest.raises(InvalidRef, match="not a regular file"):
            f.fetch(str(tmp_path), tmp_path)
        with pytest.raises(TooLarge):
            f.fetch(str(path), tmp_path)
        with pytest.raises(InvalidRef, match="no such file"):
            f.fetch(str(tmp_path / "missing.png"), tmp_path)


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def iter_chunks(self, chunk_size: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]

    def close(self) -> None:
        self.closed = True


class _S3:
    def __init__(self, objects: dict[tuple[str, str], bytes]) -> None:
        self.objects = objects
        self.bodies: list[_Body] = []

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if (Bucket, Key) not in self.objects:
            error = {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}
            raise ClientError(error, "GetObject")
        body = _Body(self.objects[Bucket, Key])
        self.bodies.append(body)
        return {"Body": body, "ContentLength": len(body.data)}


def test_s3_object_is_streamed_hashed_and_sniffed(tmp_path: Path) -> None:
    s3 = _S3({("media", "in/a b.png"): PNG})
    with Fetcher(FetchSettings(), embedded=False, s3_client=s3) as f:
        got = f.fetch("s3://media/in/a b.png", tmp_path)
        with pytest.raises(FetchFailed, match="NoSuchKey") as info:
            f.fetch("s3://media/missing", tmp_path)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert got.path.read_bytes() == PNG
    assert info.value.permanent
    assert all(body.closed for body in s3.bodies)


def test_s3_object_over_the_cap_leaves_no_file(tmp_path: Path) -> None:
    s3 = _S3({("media", "big"): PNG * 10})
    with (
        Fetcher(FetchSettings(max_bytes=1000), embedded=False, s3_client=s3) as f,
        pytest.raises(TooLarge),
    ):
        f.fetch("s3://media/big", tmp_path)
    assert _leftovers(tmp_path) == []


def test_s3_without_a_client_is_an_invalid_ref(tmp_path: Path) -> None:
    with _fetcher() as f, pytest.raises(InvalidRef, match="S3 client"):
        f.fetch("s3://media/a.png", tmp_path)


@pytest.mark.parametrize("ref", ["ftp://example.com/a.mp4", "data:image/png;base64,AAAA"])
def test_unsupported_schemes_are_invalid_refs(tmp_path: Path, ref: str) -> None:
    with _fetcher() as f, pytest.raises(InvalidRef, match="is not fetched"):
        f.fetch(ref, tmp_path)
