"""Hostile bodies: lying lengths, endless and dripping streams, compression bombs.

Hostile input suite, network half. Every server here is a raw threaded HTTP server on
127.0.0.1 (tests/security/netharness.py), reached with exactly 127.0.0.0/8 allowed and
the rest of the network sealed. Each case must end at the byte cap (decoded bytes) or the
time cap with one of the fetcher's error types, leave no partial file behind, keep memory
far below what the server tried to make us hold, and never echo the URL's signature.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import TypeVar

import pytest

from synthwatch.errors import FetchFailed, FetchTimeout, SynthwatchError, TooLarge
from synthwatch.operators.fetch import Fetcher, FetchSettings
from tests.security.netharness import PNG, HttpServer, Reply, Route

pytestmark = pytest.mark.usefixtures("sealed_net")

MAX_BYTES = 1 << 20
TIMEOUT_S = 1.0
# The fetcher streams to disk in 64 KiB pieces; a few MiB covers the interpreter's own
# churn, while every bomb and endless body below offers 100x more.
MEMORY_BOUND = 4 << 20
BOMB_EXPANDS_TO = 128 << 20
SECRET = "S3CR3T"

E = TypeVar("E", bound=SynthwatchError)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "fetched"


def _fetcher(**settings: object) -> Fetcher:
    base: dict[str, object] = {
        "allow_networks": ("127.0.0.0/8",),
        "max_bytes": MAX_BYTES,
        "timeout_s": TIMEOUT_S,
        "connect_timeout_s": TIMEOUT_S,
    }
    return Fetcher(FetchSettings(**(base | settings)), embedded=False)


def _signed(server: HttpServer, path: str) -> str:
    return server.url(f"{path}?X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}&n=1")


def _refused(
    expected: type[E], server: HttpServer, route: Route, dest: Path
) -> tuple[E, float, int]:
    """Fetch `route` expecting `expected`; the error, seconds taken and traced memory peak.

    Also pins what every hostile body must leave behind: no file, no signature shown.
    """
    server.routes["/m"] = route
    tracemalloc.start()
    started = time.monotonic()
    try:
        with _fetcher() as f, pytest.raises(expected) as info:
            f.fetch(_signed(server, "/m"), dest)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (sorted(dest.iterdir()) if dest.exists() else []) == []
    assert SECRET not in str(info.value)
    assert "X-Amz-Signature=REDACTED" in str(info.value)
    return info.value, elapsed, peak


def _assert_cut_at_the_time_cap(elapsed: float) -> None:
    # Not before the budget (no per-read timeout fired early), not long after it.
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 1.0


def _forever(r: Reply, piece: bytes) -> None:
    while True:
        r.write(piece)


# --- bodies that lie about their length ------------------------------------------------------


def test_content_length_longer_than_the_body_then_close_is_a_broken_transfer(
    http_server: HttpServer, dest: Path
) -> None:
    def route(r: Reply) -> None:
        r.head(Content_Length=str(len(PNG) * 10))
        r.write(PNG)

    exc, _, _ = _refused(FetchFailed, http_server, route, dest)
    assert not exc.permanent
    assert "peer closed connection without sending complete message body" in str(exc)


def test_content_length_longer_than_the_body_on_a_held_connection_times_out(
    http_server: HttpServer, dest: Path
) -> None:
    def route(r: Reply) -> None:
        r.head(Content_Length=str(len(PNG) * 10))
        r.write(PNG)
        r.sleep(30)  # the promised rest never comes, and the connection stays open

    exc, elapsed, _ = _refused(FetchTimeout, http_server, route, dest)
    assert f"exceeded its {TIMEOUT_S:g} s budget" in str(exc)
    _assert_cut_at_the_time_cap(elapsed)


def test_content_length_shorter_than_the_body_bounds_what_is_stored(
    http_server: HttpServer, dest: Path
) -> None:
    # Everything after the declared length (here far more than the cap) is not the body.
    def route(r: Reply) -> None:
        r.head(Content_Length=str(len(PNG)))
        r.write(PNG)
        _forever(r, b"\0" * 65536)

    http_server.routes["/m"] = route
    with _fetcher() as f:
        got = f.fetch(http_server.url("/m"), dest)
    assert got.size == len(PNG)
    assert got.path.read_bytes() == PNG
    assert sorted(dest.iterdir()) == [got.path]


def test_small_content_length_beside_chunked_does_not_bound_the_body(
    http_server: HttpServer, dest: Path
) -> None:
    # Transfer-Encoding wins over Content-Length (RFC 9112 6.3); the body is endless, so
    # only the decoded-byte cap can stop it.
    def route(r: Reply) -> None:
        r.head(Content_Length="100", Transfer_Encoding="chunked")
        r.write(b"%x\r\n%s\r\n" % (len(PNG), PNG))
        _forever(r, b"10000\r\n" + b"\0" * 65536 + b"\r\n")

    exc, _, peak = _refused(TooLarge, http_server, route, dest)
    assert f"over the cap of {MAX_BYTES} bytes" in str(exc)
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 10\r\nContent-Length: 5000",  # conflicting duplicates
        "Content-Length: -1",
        "Content-Length: 12abc",
        "Content-Length: 0x100",
        "Transfer-Encoding: gzip, chunked",  # only chunked is a transfer coding we accept
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
    ],
)
def test_malformed_framing_is_a_failed_fetch(
    framing: str, http_server: HttpServer, dest: Path
) -> None:
    def route(r: Reply) -> None:
        r.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode() + PNG)

    _refused(FetchFailed, http_server, route, dest)


# --- bodies that never end -----------------------------------------------------------------


def _endless_chunked(r: Reply) -> None:
    r.head(Transfer_Encoding="chunked")
    r.write(b"%x\r\n%s\r\n" % (len(PNG), PNG))
    _forever(r, b"10000\r\n" + b"\0" * 65536 + b"\r\n")


def _endless_until_close(r: Reply) -> None:
    r.head()  # no length at all: the body ends when the connection does, i.e. never
    r.write(PNG)
    _forever(r, b"\0" * 65536)


def _endless_chunk_size(r: Reply) -> None:
    r.head(Transfer_Encoding="chunked")
    r.write(b"%x\r\n%s\r\n" % (len(PNG), PNG))
    r.write(b"FFFFFFFFFFFFFFF\r\n")  # one chunk "petabytes" long
    _forever(r, b"\0" * 65536)


@pytest.mark.parametrize("route", [_endless_chunked, _endless_until_close, _endless_chunk_size])
def test_endless_body_stops_at_the_byte_cap_in_bounded_memory(
    route: Route, http_server: HttpServer, dest: Path
) -> None:
    exc, elapsed, peak = _refused(TooLarge, http_server, route, dest)
    assert "the body is larger, over the cap" in str(exc)
    assert elapsed < TIMEOUT_S  # the cap, not the clock, ended it
    assert peak < MEMORY_BOUND


def test_endless_headers_are_refused_in_bounded_memory(http_server: HttpServer, dest: Path) -> None:
    def route(r: Reply) -> None:
        r.write(b"HTTP/1.1 200 OK\r\n")
        _forever(r, b"X-Pad: " + b"a" * 1000 + b"\r\n")

    _, _, peak = _refused(FetchFailed, http_server, route, dest)
    assert peak < MEMORY_BOUND


def test_endless_chunk_extension_is_refused_in_bounded_memory(
    http_server: HttpServer, dest: Path
) -> None:
    def route(r: Reply) -> None:
        r.head(Transfer_Encoding="chunked")
        r.write(b"10;ext=")
        _forever(r, b"a" * 4096)

    _, _, peak = _refused(FetchFailed, http_server, route, dest)
    assert peak < MEMORY_BOUND


def test_endless_interim_responses_stop_at_the_time_cap(
    http_server: HttpServer, dest: Path
) -> None:
    # 1xx responses may precede the real one; an endless run of them sends bytes at full
    # speed, so no read ever blocks and only the total budget ends it.
    def route(r: Reply) -> None:
        _forever(r, b"HTTP/1.1 100 Continue\r\n\r\n" * 64)

    _, elapsed, _ = _refused(FetchTimeout, http_server, route, dest)
    _assert_cut_at_the_time_cap(elapsed)


# --- bodies that drip ----------------------------------------------------------------------

DRIP_S = 0.05  # far inside any per-read timeout, so only the total budget can fire


def _drip(r: Reply, data: bytes) -> None:
    for byte in data:
        r.write(bytes([byte]))
        r.sleep(DRIP_S)


def _drip_status_line(r: Reply) -> None:
    _drip(r, b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 1000)


def _drip_headers(r: Reply) -> None:
    r.write(b"HTTP/1.1 200 OK\r\n")
    _drip(r, b"".join(b"X-Slow-%d: 1\r\n" % i for i in range(200)))


def _drip_identity_body(r: Reply) -> None:
    r.head(Content_Length=str(len(PNG)))
    _drip(r, PNG)


def _drip_chunked_body(r: Reply) -> None:
    r.head(Transfer_Encoding="chunked")
    for byte in PNG:
        r.write(b"1\r\n%s\r\n" % bytes([byte]))
        r.sleep(DRIP_S)


def _drip_gzip_body(r: Reply) -> None:
    data = gzip.compress(PNG)
    r.head(Content_Encoding="gzip", Content_Length=str(len(data)))
    _drip(r, data)


def _silent(r: Reply) -> None:
    r.sleep(30)  # accept, read the request, answer nothing


@pytest.mark.parametrize(
    "route",
    [
        _drip_status_line,
        _drip_headers,
        _drip_identity_body,
        _drip_chunked_body,
        _drip_gzip_body,
        _silent,
    ],
)
def test_slow_response_is_cut_at_the_total_time_cap(
    route: Route, http_server: HttpServer, dest: Path
) -> None:
    exc, elapsed, _ = _refused(FetchTimeout, http_server, route, dest)
    assert "(SYNTHWATCH_FETCH__TIMEOUT_S)" in str(exc)
    _assert_cut_at_the_time_cap(elapsed)


def test_the_time_cap_spans_every_redirect_hop(http_server: HttpServer, dest: Path) -> None:
    # Each hop alone is well inside the budget; together they are not.
    def hop(n: int) -> Route:
        def route(r: Reply) -> None:
            r.sleep(TIMEOUT_S * 0.4)
            location = f"/m{n + 1}?X-Amz-Signature={SECRET}"
            r.head("302 Found", Location=location, Content_Length="0")

        return route

    for n in range(1, 6):
        http_server.routes[f"/m{n}"] = hop(n)
    http_server.routes["/m"] = hop(0)
    _, elapsed, _ = _refused(FetchTimeout, http_server, hop(0), dest)
    _assert_cut_at_the_time_cap(elapsed)
    assert len(http_server.requests) == 3


# --- compression bombs and encodings -------------------------------------------------------


@functools.cache
def _raw_deflate_bomb() -> tuple[bytes, int, int]:
    """A raw deflate stream of PNG magic + zeros, BOMB_EXPANDS_TO bytes; with its crc32
    and adler32 so that the gzip and zlib wrappings are valid streams, not truncated ones."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = PNG[:16]
    zeros = b"\0" * (1 << 20)
    out = [c.compress(head)]
    crc, adler = zlib.crc32(head), zlib.adler32(head)
    for _ in range((BOMB_EXPANDS_TO - len(head)) >> 20):
        out.append(c.compress(zeros))
        crc, adler = zlib.crc32(zeros, crc), zlib.adler32(zeros, adler)
    out.append(c.flush())
    return b"".join(out), crc, adler


def _bomb(wrapping: str) -> bytes:
    raw, crc, adler = _raw_deflate_bomb()
    size = BOMB_EXPANDS_TO - BOMB_EXPANDS_TO % (1 << 20) + 16
    if wrapping == "gzip":
        return b"\x1f\x8b\x08\0\0\0\0\0\x02\xff" + raw + struct.pack("<II", crc, size & 0xFFFFFFFF)
    if wrapping == "zlib":
        return b"\x78\xda" + raw + struct.pack(">I", adler)
    return raw


@pytest.mark.parametrize(
    ("encoding", "wrapping", "chunked"),
    [
        ("gzip", "gzip", False),
        ("x-gzip", "gzip", False),
        ("gzip", "gzip", True),
        ("deflate", "zlib", False),
        ("deflate", "raw", False),
        ("deflate", "raw", True),
    ],
)
def test_compression_bomb_stops_at_the_decoded_cap_in_bounded_memory(
    encoding: str, wrapping: str, chunked: bool, http_server: HttpServer, dest: Path
) -> None:
    bomb = _bomb(wrapping)
    assert len(bomb) < MAX_BYTES // 2  # honest on the wire, far under the cap

    def route(r: Reply) -> None:
        if chunked:
            r.head(Content_Encoding=encoding, Transfer_Encoding="chunked")
            for i in range(0, len(bomb), 8192):
                piece = bomb[i : i + 8192]
                r.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            r.write(b"0\r\n\r\n")
        else:
            r.head(Content_Encoding=encoding, Content_Length=str(len(bomb)))
            r.write(bomb)

    exc, elapsed, peak = _refused(TooLarge, http_server, route, dest)
    assert f"over the cap of {MAX_BYTES} bytes" in str(exc)
    assert elapsed < TIMEOUT_S
    # 128 MiB offered; one read of a deflate bomb inflates ~1000x, so an unbounded decoder
    # would hold ~64 MiB at once before any cap could look.
    assert peak < MEMORY_BOUND


@pytest.mark.parametrize(
    "encoding_lines",
    [
        "Content-Encoding: br",  # brotli is not installed, and never asked for
        "Content-Encoding: zstd",
        "Content-Encoding: compress",
        "Content-Encoding: gzip, br",
        "Content-Encoding: gzip, gzip",
        "Content-Encoding: gzip\r\nContent-Encoding: deflate",
    ],
)
def test_unsupported_content_encoding_is_refused_before_the_body_is_read(
    encoding_lines: str, http_server: HttpServer, dest: Path
) -> None:
    # The fetcher sends Accept-Encoding: identity; a server that sends br anyway gets a
    # clear refusal instead of an opaque blob stored, or an unbounded buffer.
    def route(r: Reply) -> None:
        r.write(f"HTTP/1.1 200 OK\r\n{encoding_lines}\r\nConnection: close\r\n\r\n".encode())
        _forever(r, b"\xff" * 65536)

    exc, elapsed, peak = _refused(FetchFailed, http_server, route, dest)
    assert "unsupported Content-Encoding" in str(exc)
    assert "decodes only gzip or deflate" in str(exc)
    assert exc.permanent
    assert elapsed < TIMEOUT_S
    assert peak < MEMORY_BOUND


def _encoded(data: bytes, encoding: str = "gzip") -> Route:
    def route(r: Reply) -> None:
        r.head(Content_Encoding=encoding, Content_Length=str(len(data)))
        r.write(data)

    return route


def _one_byte_chunks(data: bytes, encoding: str) -> Route:
    def route(r: Reply) -> None:
        r.head(Content_Encoding=encoding, Transfer_Encoding="chunked")
        for byte in data:
            r.write(b"1\r\n%s\r\n" % bytes([byte]))
        r.write(b"0\r\n\r\n")

    return route


def _deflate(data: bytes, wbits: int) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "data", "one_byte_chunks"),
    [
        ("gzip", gzip.compress(PNG), False),
        ("x-gzip", gzip.compress(PNG), False),
        ("GZIP", gzip.compress(PNG), False),
        ("deflate", _deflate(PNG, zlib.MAX_WBITS), False),
        ("deflate", _deflate(PNG, -zlib.MAX_WBITS), False),
        ("deflate", _deflate(PNG, zlib.MAX_WBITS), True),
        ("deflate", _deflate(PNG, -zlib.MAX_WBITS), True),
        ("gzip", gzip.compress(PNG), True),
    ],
)
def test_honest_compressed_body_still_decodes(
    encoding: str, data: bytes, one_byte_chunks: bool, http_server: HttpServer, dest: Path
) -> None:
    # Control for the caps above: decoding in bounded pieces yields the same bytes.
    http_server.routes["/m"] = (
        _one_byte_chunks(data, encoding) if one_byte_chunks else _encoded(data, encoding)
    )
    with _fetcher() as f:
        got = f.fetch(http_server.url("/m"), dest)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert got.path.read_bytes() == PNG


@pytest.mark.parametrize(
    ("name", "data", "transient"),
    [
        # Cut before the trailer: zlib never checks the CRC, so this was stored as whole.
        ("truncated", gzip.compress(PNG * 4)[:-12], True),
        ("trailing bytes", gzip.compress(PNG) + b"<html>junk</html>", False),
        ("second member", gzip.compress(PNG) + gzip.compress(b"\0" * 100), False),
        ("corrupt", gzip.compress(PNG)[:10] + b"\x07" + b"\0" * 64, False),  # block type 3
        ("bad crc", gzip.compress(PNG)[:-8] + b"\0\0\0\0" + gzip.compress(PNG)[-4:], False),
        ("not gzip at all", PNG, False),
    ],
)
def test_damaged_gzip_is_a_failed_fetch_not_a_stored_file(
    name: str, data: bytes, transient: bool, http_server: HttpServer, dest: Path
) -> None:
    exc, _, _ = _refused(FetchFailed, http_server, _encoded(data), dest)
    assert exc.permanent is not transient


# --- what a failure shows and logs ---------------------------------------------------------


def test_transport_logs_never_show_signatures(
    http_server: HttpServer, dest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Everything at DEBUG, as an embedding application might configure it: httpx logs
    # each request URL, httpcore each response's headers (a redirect's Location too).
    def redirect(r: Reply) -> None:
        location = f"/b?X-Goog-Signature={SECRET}&sig={SECRET}"
        r.head("302 Found", Location=location, Content_Length="0")

    def image(r: Reply) -> None:
        r.head(Content_Length=str(len(PNG)))
        r.write(PNG)

    http_server.routes["/a"] = redirect
    http_server.routes["/b"] = image
    http_server.routes["/c"] = _endless_chunked
    for name in (None, "httpx", "httpcore"):  # whatever levels earlier tests left behind
        caplog.set_level(logging.DEBUG, logger=name)
    with _fetcher() as f:
        f.fetch(_signed(http_server, "/a"), dest)
        with pytest.raises(TooLarge) as info:
            f.fetch(_signed(http_server, "/c"), dest)
    assert "HTTP Request: GET http://127.0.0.1" in caplog.text  # the records were captured
    assert "Location" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in str(info.value)
    assert all(SECRET not in str(getattr(r, "args", "")) for r in caplog.records)
