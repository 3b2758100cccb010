"""SSRF guard for the fetcher: which addresses may be contacted, and a client that enforces it.

The decision is made where it cannot be raced: `GuardedBackend.connect_tcp` resolves the
name once, classifies every answer and connects to the vetted IP literal itself, so a DNS
answer that changes between a check and the connect (rebinding) never reaches a socket.
`check_url` repeats the literal-address part of that check before any I/O only to give an
early, clear message; it is not what keeps the fetcher safe.

The checks run on every hop because the fetcher follows redirects itself and every hop
goes through the same client, hence the same backend.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import time
import typing
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

# httpcore's own socket stream (read/write/TLS/is_readable); only its constructor is used.
from httpcore._backends.sync import SyncStream

from synthwatch.errors import InvalidRef, RefusedAddress
from synthwatch.operators.redact import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_PRIVATE_HINT = "set SYNTHWATCH_FETCH__ALLOW_PRIVATE=true only for trusted deployments"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Instance-metadata endpoints hand out cloud credentials; no media lives there, so they
# stay refused even when `allow_private` opens the private ranges for a trusted deployment.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack IMDS
        "169.254.169.253",  # AWS VPC DNS resolver
        "169.254.169.123",  # AWS time sync
        "169.254.170.2",  # AWS ECS task metadata / credentials
        "169.254.170.23",  # AWS EKS pod identity agent
        "169.254.0.23",  # Tencent Cloud metadata
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud (legacy) metadata
        "168.63.129.16",  # Azure WireServer: public-looking, host-only
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity agent over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)

# Order matters: the first match names the reason, so narrower ranges come first.
_V4_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "this_network"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("169.254.0.0/16"), "link_local"),
    (_V4("100.64.0.0/10"), "cgnat"),
    (_V4("192.0.0.0/24"), "reserved"),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("198.18.0.0/15"), "benchmark"),
    (_V4("192.88.99.0/24"), "reserved"),  # deprecated 6to4 relay anycast
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_V6_RANGES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("2001:2::/48"), "benchmark"),
    (_V6("fc00::/7"), "unique_local"),
    (_V6("fe80::/10"), "link_local"),
    (_V6("fec0::/10"), "site_local"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("100::/64"), "reserved"),  # discard-only
    (_V6("::/96"), "reserved"),  # deprecated IPv4-compatible
)

_MAPPED = _V6("::ffff:0:0/96")
_NAT64_WKP = _V6("64:ff9b::/96")
_NAT64_LOCAL = _V6("64:ff9b:1::/48")
_6TO4 = _V6("2002::/16")
_TEREDO = _V6("2001::/32")
_V4_COMPATIBLE = _V6("::/96")

_DESCRIPTIONS: dict[str, str] = {
    "loopback": "a loopback address",
    "private": "a private (RFC 1918) address",
    "link_local": "a link-local address",
    "metadata": "a cloud metadata address",
    "cgnat": "a carrier-grade NAT (100.64.0.0/10) address",
    "multicast": "a multicast address",
    "broadcast": "the broadcast address",
    "reserved": "a reserved, non-routable address",
    "unspecified": "the unspecified address (it reaches this host)",
    "this_network": "a 'this network' (0.0.0.0/8) address",
    "documentation": "a documentation-only address",
    "benchmark": "a benchmarking-only address",
    "unique_local": "a unique-local (private IPv6) address",
    "site_local": "a site-local (private IPv6) address",
    "ipv4_mapped": "an IPv4-mapped address of a non-public IPv4 address",
    "nat64": "a NAT64 address of a non-public IPv4 address",
    "6to4": "a 6to4 address of a non-public IPv4 address",
    "teredo": "a Teredo address of a non-public IPv4 address",
}


def _nat64_local_candidates(ip: ipaddress.IPv6Address) -> Iterator[ipaddress.IPv4Address]:
    """IPv4 addresses an RFC 6052 translator could read out of a 64:ff9b:1::/48 address.

    The local-use prefix may be any of /48, /56, /64 or /96 and the address does not say
    which, so every layout is judged (the byte at bits 64..71 is the reserved "u" octet).
    """
    b = ip.packed
    yield ipaddress.IPv4Address(b[12:16])  # /96
    yield ipaddress.IPv4Address(b[6:8] + b[9:11])  # /48
    yield ipaddress.IPv4Address(b[7:8] + b[9:12])  # /56
    yield ipaddress.IPv4Address(b[9:13])  # /64


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[str, tuple[ipaddress.IPv4Address, ...]] | None:
    """The kind of IPv4-embedding address `ip` is and the IPv4 addresses its packets may be
    translated to (IPv4-mapped, NAT64, 6to4, Teredo), or None for a native IPv6 address."""
    if ip in _MAPPED:
        assert ip.ipv4_mapped is not None
        return "ipv4_mapped", (ip.ipv4_mapped,)
    if ip in _NAT64_WKP:
        return "nat64", (ipaddress.IPv4Address(ip.packed[12:16]),)
    if ip in _NAT64_LOCAL:
        return "nat64", tuple(_nat64_local_candidates(ip))
    if ip in _6TO4:
        assert ip.sixtofour is not None
        return "6to4", (ip.sixtofour,)
    if ip in _TEREDO:
        assert ip.teredo is not None
        return "teredo", ip.teredo
    return None


def classify(ip: IPAddress) -> str | None:
    """Why `ip` must not be contacted (a short reason such as `loopback`), or None if public.

    Addresses that embed an IPv4 address a router would translate to (IPv4-mapped, NAT64,
    6to4, Teredo) are judged by that IPv4 address, since that is where packets end up.
    """
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(ip, ipaddress.IPv4Address):
        for net, reason in _V4_RANGES:
            if ip in net:
                return reason
        # Catch-all for special-purpose ranges registered after the table above was written.
        return None if ip.is_global else "reserved"

    if ip.scope_id:
        # A zone id only makes sense for link-local destinations.
        return "link_local"
    embedded = _embedded_v4(ip)
    if embedded is not None:
        kind, inner = embedded
        return kind if any(classify(v4) is not None for v4 in inner) else None
    for net6, reason in _V6_RANGES:
        if ip in net6:
            return reason
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def targets_metadata(ip: IPAddress) -> bool:
    """Whether `ip` is a cloud metadata address or an IPv6 address whose packets reach one.

    `classify` names an embedding address by its form (`ipv4_mapped`, `nat64`), but
    ::ffff:169.254.169.254 reaches the metadata service over IPv4 from any dual-stack
    socket, so it must stay refused under `allow_private` exactly as 169.254.169.254 does.
    Deprecated IPv4-compatible addresses (::a.b.c.d) count too.
    """
    if ip in METADATA_ADDRESSES:
        return True
    if isinstance(ip, ipaddress.IPv4Address):
        return False
    embedded = _embedded_v4(ip)
    if embedded is not None:
        inner = embedded[1]
    elif ip in _V4_COMPATIBLE:
        inner = (ipaddress.IPv4Address(ip.packed[12:16]),)
    else:
        inner = ()
    return any(v4 in METADATA_ADDRESSES for v4 in inner)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """`allow_networks` settings as networks; a malformed CIDR is a clear error."""
    out: list[Network] = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise InvalidRef(f"SYNTHWATCH_FETCH__ALLOW_NETWORKS: {cidr!r} is not a CIDR") from None
    return tuple(out)


def is_allowed(
    ip: IPAddress, *, allow_private: bool, allow_networks: tuple[Network, ...] = ()
) -> bool:
    """Whether the fetcher may connect to `ip`: public; or, for a trusted deployment, any
    non-metadata address (`allow_private`) or one inside an explicitly allowed network."""
    reason = classify(ip)
    if reason is None:
        return True
    if reason == "metadata" or targets_metadata(ip):
        return False
    return allow_private or any(ip in net for net in allow_networks if net.version == ip.version)


def describe(reason: str) -> str:
    """A `classify` reason in words: `metadata` -> `a cloud metadata address`."""
    return _DESCRIPTIONS.get(reason, f"a {reason.replace('_', ' ')} address")


def explain(ip: IPAddress, reason: str) -> str:
    """One human sentence fragment: `169.254.169.254 is a cloud metadata address`."""
    return f"{ip} is {describe(reason)}"


def refusal_hint(reason: str) -> str:
    """What the user can do about a refusal, if anything."""
    if reason == "metadata":
        return "metadata addresses are refused even with SYNTHWATCH_FETCH__ALLOW_PRIVATE=true"
    return ALLOW_PRIVATE_HINT


def _hint_for(ip: IPAddress, reason: str) -> str:
    # An embedded metadata address is not opened by any setting; do not suggest one.
    return refusal_hint("metadata" if targets_metadata(ip) else reason)


# glibc's inet_aton accepts 1-4 parts, each decimal, octal (leading 0) or hex (0x), and
# then ignores anything after whitespace; the character filter keeps that tail out.
_LEGACY_V4 = re.compile(r"^[0-9a-fx.]+$")


def parse_host(host: str) -> IPAddress | None:
    """The address a URL host denotes if it is an IP literal in any form libc accepts, else None.

    Attackers write 127.0.0.1 as `2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`,
    `[::ffff:127.0.0.1]`, `127.0.0.1.` or with full-width digits; all of these reach the
    same socket, so all of them are normalised to the address before classification.
    None means the host is a DNS name (it is judged after resolution, at connect time).
    """
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.replace("%25", "%")  # URL-encoded IPv6 zone separator
    if h.endswith(".") and not h.endswith(".."):
        h = h[:-1]
    if not h.isascii():
        # IDNA (nameprep: NFKC) is how a non-ASCII name reaches the resolver; it turns
        # full-width digits and dots into ASCII ones.
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    with contextlib.suppress(ValueError):  # not canonical: try the legacy forms below
        return ipaddress.ip_address(h)
    if _LEGACY_V4.match(h) and not h.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def check_url(
    url: str, *, allow_private: bool, allow_networks: tuple[Network, ...] = ()
) -> httpx.URL:
    """Parse and vet one http(s) hop before any I/O.

    Raises:
        InvalidRef: not http(s), no host, credentials in the URL, or malformed.
        RefusedAddress: the host is an IP literal (in any spelling) that is not allowed.
    """
    shown = redact_url(url)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        # httpx quotes the part it could not parse; with userinfo present that part can be
        # a piece of the password ("Invalid port: 'hunter'"), so the detail is dropped.
        detail = "" if "@" in url else f" ({exc})"
        raise InvalidRef(f"refused {shown}: malformed URL{detail}") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRef(
            f"refused {shown}: scheme {parsed.scheme or '(none)'!r} is not fetched; "
            "use http://, https:// or s3://"
        )
    if parsed.userinfo:
        # Credentials in URLs end up in logs and DLQ records; use a presigned URL instead.
        raise InvalidRef(
            f"refused {shown}: URLs with a username or password are not fetched; "
            "use a presigned URL or s3:// with configured credentials"
        )
    if not parsed.raw_host:
        raise InvalidRef(f"refused {shown}: the URL has no host")
    ip = parse_host(parsed.raw_host.decode("ascii"))
    if ip is not None and not is_allowed(
        ip, allow_private=allow_private, allow_networks=allow_networks
    ):
        reason = classify(ip)
        assert reason is not None
        raise RefusedAddress(f"refused {shown}: {explain(ip, reason)} ({_hint_for(ip, reason)})")
    return parsed


# --- connect-time guard --------------------------------------------------------------

# The wall-clock deadline (time.monotonic()) of the transfer running in this thread or
# task. Per-read timeouts alone cannot stop a server that drips one byte just inside each
# timeout, so every read and write on a guarded stream is clamped to what is left.
_deadline: ContextVar[float | None] = ContextVar("synthwatch_fetch_deadline", default=None)


@contextlib.contextmanager
def transfer_deadline(deadline: float) -> Iterator[None]:
    """Bound every socket operation of guarded clients in this context by `deadline` (monotonic)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def _clamp(timeout: float | None, timeout_exc: type[Exception]) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_exc("transfer deadline exceeded")
    return left if timeout is None else min(timeout, left)


class GuardedStream(httpcore.NetworkStream):
    """A network stream whose reads, writes and TLS handshake respect the transfer deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # httpcore passes the URL's hostname here (not the IP we connected to), so SNI
        # and certificate verification are against the name the user asked for.
        try:
            timeout = _clamp(timeout, httpcore.ConnectTimeout)
        except httpcore.ConnectTimeout:
            self.close()  # httpcore drops the stream on failure; the socket must not leak
            raise
        return GuardedStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


Resolver = typing.Callable[[str, int], list[tuple[Any, ...]]]


def _sockaddr_info(ip: IPAddress, port: int) -> tuple[Any, ...]:
    """A getaddrinfo-shaped entry for an address that needs no resolution."""
    if isinstance(ip, ipaddress.IPv4Address):
        return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port))
    return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port, 0, 0))


def _system_resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    # Looked up through the module at call time so tests can monkeypatch socket.getaddrinfo.
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore backend that resolves names itself and connects only to allowed IP literals.

    Every resolved address is classified; refused ones are never connected to, allowed ones
    are tried in resolver order. Because the socket is opened to the vetted literal, the
    resolver cannot be asked a second time and answer differently (DNS rebinding).
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allow_networks: tuple[Network, ...] = (),
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.allow_networks = allow_networks
        self._resolve = resolver or _system_resolve

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _clamp(timeout, httpcore.ConnectTimeout)
        last_error: OSError | None = None
        for family, sockaddr in self.vet(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            except TimeoutError as exc:
                sock.close()
                raise httpcore.ConnectTimeout(f"connect to {sockaddr[0]} timed out") from exc
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            return GuardedStream(SyncStream(sock))
        raise httpcore.ConnectError(f"cannot connect to {host}: {last_error}")

    def vet(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        """The (family, sockaddr) pairs `host` may be connected to, in resolver order.

        Raises `RefusedAddress` when every address it resolves to is refused, and
        `httpcore.ConnectError` when it does not resolve.
        """
        literal = parse_host(host)
        candidates: list[tuple[int, tuple[Any, ...]]] = []
        refused: list[tuple[IPAddress, str]] = []
        if literal is not None:
            # An IP literal in any spelling is connected to as the address `parse_host`
            # judged, never handed to the resolver: libc parsers differ on spellings such
            # as `127.0.0.1.` (glibc asks DNS) or `0x7f.1` (musl), and the check and the
            # connect must agree on the address.
            infos = [_sockaddr_info(literal, port)]
        else:
            try:
                infos = self._resolve(host, port)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(sockaddr[0])
            if is_allowed(ip, allow_private=self.allow_private, allow_networks=self.allow_networks):
                candidates.append((family, sockaddr))
            else:
                reason = classify(ip)
                assert reason is not None
                refused.append((ip, reason))
        if not candidates:
            if refused:
                ip, reason = refused[0]
                if literal is None:
                    what = f"{host} resolves to {ip}, {describe(reason)}"
                else:
                    what = explain(ip, reason)
                raise RefusedAddress(f"{what} ({_hint_for(ip, reason)})")
            raise httpcore.ConnectError(f"{host} has no IPv4 or IPv6 address")
        return candidates

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise RefusedAddress("unix sockets are never fetched from")


# httpx logs every request's full URL at INFO and httpcore logs response headers (a
# redirect's Location included) at DEBUG. A presigned URL's signature is a bearer
# credential, so whatever level an embedding application turns on, those records carry
# redacted URLs. The `synthwatch` entry points also keep both loggers at WARNING.
_TRANSPORT_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2")
# A URL with an authority (absolute or "//host"), or any reference with a query: a
# redirect's Location is often relative ("/b?X-Amz-Signature=...").
_URL_IN_TEXT = re.compile(
    r"""(?:[a-z][a-z0-9+.-]*:)?//[^\s'"<>\\]+|[^\s'"<>\\]*\?[^\s'"<>\\]*""", re.IGNORECASE
)


class _RedactUrls(logging.Filter):
    """Rewrites every URL or query in a transport log record with `redact_url`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _URL_IN_TEXT.search(message):
            record.msg = _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), message)
            record.args = ()
        return True


_REDACT_URLS = _RedactUrls()


def _redact_transport_logs() -> None:
    for name in _TRANSPORT_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT_URLS not in logger.filters:
            logger.addFilter(_REDACT_URLS)


def guarded_client(
    *,
    allow_private: bool = False,
    allow_networks: Iterable[str] = (),
    user_agent: str = "synthwatch",
    timeout_s: float = 120.0,
    connect_timeout_s: float = 10.0,
    resolver: Resolver | None = None,
) -> httpx.Client:
    """An httpx client whose every connection goes through `GuardedBackend`.

    No environment proxies (a proxy would make the connect-time check judge the proxy,
    not the destination), no automatic redirects (the caller re-checks every hop), no
    retries inside httpcore (the pipeline decides about retries), and URLs in httpx's and
    httpcore's log records redacted.
    """
    _redact_transport_logs()
    backend = GuardedBackend(
        allow_private=allow_private,
        allow_networks=parse_networks(allow_networks),
        resolver=resolver,
    )
    # httpx 0.28's HTTPTransport has no network_backend argument; its pool is built in
    # __init__ and used only through self._pool, so swapping the pool is the narrow seam.
    transport = httpx.HTTPTransport(trust_env=False, retries=0)
    ssl_context = httpx.create_ssl_context(trust_env=False)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=16,
        max_keepalive_connections=8,
        keepalive_expiry=5.0,
        http1=True,
        http2=False,
        retries=0,
        network_backend=backend,
    )
    return httpx.Client(
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        headers={"User-Agent": user_agent},
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
    )
