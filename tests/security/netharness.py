"""A sealed network and hostile local servers for the network half of the security suite.

Nothing built here can reach past this machine. `SealedNet.install` wraps
`socket.socket.connect` so that every connect is recorded before it is judged: loopback
goes through, an address registered as a stand-in for a public host is rewritten to
127.0.0.1 (the local server plays that host), and anything else is refused locally. Name
lookups never reach a DNS server: numeric hosts are parsed locally (AI_NUMERICHOST) and
names are answered from a table the test fills. A guard that failed would therefore fail
a test, not send traffic anywhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 20
"""Bytes the sniffer accepts as an image."""

PUBLIC_IP = "93.184.216.34"
"""A public address whose connects `SealedNet` serves from 127.0.0.1 (never contacted)."""

_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect


@dataclass
class SealedNet:
    """What the code under test tried to do on the network, and the fake DNS it sees."""

    connects: list[tuple[str, int]] = field(default_factory=list)
    """Every (address, port) passed to socket.connect, in order, refused ones included."""
    lookups: list[str] = field(default_factory=list)
    """Every name (not a numeric host) handed to getaddrinfo, in order."""
    dns: dict[str, list[list[str]]] = field(default_factory=dict)
    """name -> successive answers; the last answer repeats."""
    stand_ins: set[str] = field(default_factory=lambda: {PUBLIC_IP})
    """Public addresses whose connects the local server answers instead."""

    def answer(self, name: str, *answers: list[str]) -> None:
        """Make `name` resolve to each of `answers` in turn (the last one repeats)."""
        self.dns[name.lower()] = list(answers)

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo without DNS: numeric hosts parsed locally, names from `dns`."""
        try:
            return _real_getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            pass  # a name, not a number
        self.lookups.append(host)
        answers = self.dns.get(host.lower().rstrip("."))
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: not in the test's DNS table")
        asked = sum(1 for name in self.lookups if name.lower() == host.lower())
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port))
            for a in answers[min(asked, len(answers)) - 1]
        ]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Route this process's connects and lookups through the sealed network."""

        def connect(sock: socket.socket, address: Any) -> None:
            if not isinstance(address, tuple):
                self.connects.append((str(address), 0))
                raise ConnectionRefusedError(f"sealed net refused connect to {address!r}")
            host, port = str(address[0]), int(address[1])
            self.connects.append((host, port))
            if host in self.stand_ins and sock.family == socket.AF_INET:
                _real_connect(sock, ("127.0.0.1", port))
            elif ipaddress.ip_address(host.split("%")[0]).is_loopback:
                _real_connect(sock, address)
            else:
                raise ConnectionRefusedError(f"sealed net refused connect to {address!r}")

        def connect_ex(sock: socket.socket, address: Any) -> int:
            try:
                connect(sock, address)
            except OSError as exc:
                return exc.errno or 1
            return 0

        def getaddrinfo(host: str, port: Any, *_: Any, **__: Any) -> list[tuple[Any, ...]]:
            return self.resolve(host, int(port or 0))

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class Listener:
    """A bare TCP listener on 127.0.0.1 that only counts the connections that arrive."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])

    def arrivals(self) -> int:
        """Connections completed so far; a client's connect returns only once queued here."""
        count = 0
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self._sock.close()


class Reply:
    """The response side of one request: raw bytes out, sleeps that end at shutdown."""

    def __init__(self, wfile: Any, stopping: threading.Event) -> None:
        self._wfile = wfile
        self._stopping = stopping

    def write(self, data: bytes) -> None:
        self._wfile.write(data)
        self._wfile.flush()

    def head(self, status: str = "200 OK", **headers: str) -> None:
        """Status line and headers (`Content_Length` spells Content-Length), then a blank line."""
        lines = [f"HTTP/1.1 {status}", "Connection: close"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise ConnectionAbortedError("test server shutting down")


Route = Callable[[Reply], None]


class HttpServer(socketserver.ThreadingTCPServer):
    """A threaded HTTP/1.1 server on 127.0.0.1 whose routes write raw bytes.

    Raw rather than http.server, so that a route can lie about lengths, repeat headers or
    stall anywhere. One request per connection (`Connection: close`).
    """

    daemon_threads = True

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class _Handler(socketserver.StreamRequestHandler):
    server: HttpServer

    def handle(self) -> None:
        # OSError: the client hung up, as the fetcher does on every refusal and cap.
        with contextlib.suppress(OSError):
            request_line = self.rfile.readline(65536).decode("latin-1")
            # Skip the headers: up to the blank line, or the end of a cut-off request.
            for line in iter(lambda: self.rfile.readline(65536), b""):
                if line in (b"\r\n", b"\n"):
                    break
            parts = request_line.split()
            path = parts[1] if len(parts) > 1 else ""
            self.server.requests.append(path)
            route = self.server.routes.get(path.partition("?")[0])
            reply = Reply(self.wfile, self.server.stopping)
            if route is None:
                reply.head("404 Not Found", Content_Length="0")
            else:
                route(reply)
