"""SSRF: every spelling of a forbidden destination is refused before a byte is sent.

Hostile input suite, network half. Complements tests/unit/test_netguard.py (the classifier
table) and tests/unit/test_fetch.py (the fetcher's happy paths) with the attacker's view:
alternative spellings of each non-public range, redirects from an allowed or public-looking
first hop, and DNS answers that change between lookups.

Proof rules: only loopback is ever really contacted. Loopback spellings aim at a
127.0.0.1 listener, which must see no connection. Every other range runs under
`sealed_net`, which records each connect before refusing it locally (so a broken guard
fails the test rather than reaching the address), answers names from a table (no DNS), and
serves a public-looking stand-in address from the local server.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from synthwatch.errors import FetchTimeout, InvalidRef, RefusedAddress
from synthwatch.operators import netguard
from synthwatch.operators.fetch import Fetcher, FetchSettings
from synthwatch.operators.redact import redact_url
from tests.security.netharness import (
    PNG,
    PUBLIC_IP,
    HttpServer,
    Listener,
    Reply,
    Route,
    SealedNet,
)

pytestmark = pytest.mark.usefixtures("sealed_net")

# Hosts httpx itself rejects (dotted parts with leading zeros, full-width digits) fail as
# malformed URLs before the guard runs; the connect-time guard is shown to refuse them too.
_HTTPX_REJECTS = re.compile(r"^(\d+\.){3}\d+$")


def _url_error(host: str) -> type[Exception] | tuple[type[Exception], ...]:
    parts = host.split(".")
    dotted_zero = _HTTPX_REJECTS.match(host) and any(len(p) > 1 and p[0] == "0" for p in parts)
    return (RefusedAddress, InvalidRef) if dotted_zero or not host.isascii() else RefusedAddress


def _fetcher(**settings: object) -> Fetcher:
    # Small budgets: a guard that failed open would hang on the silent listener otherwise.
    base: dict[str, object] = {"timeout_s": 2.0, "connect_timeout_s": 1.0}
    return Fetcher(FetchSettings(**(base | settings)), embedded=False)


def _leftovers(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def _body(data: bytes) -> Route:
    def route(r: Reply) -> None:
        r.head(Content_Length=str(len(data)), Content_Type="image/png")
        r.write(data)

    return route


def _redirect(location: str, status: str = "302 Found") -> Route:
    def route(r: Reply) -> None:
        r.head(status, Location=location, Content_Length="0")

    return route


# --- loopback spellings, aimed at a real listener -----------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "0X7F000001",
    "0x7f.0.0.1",  # hex first part
    "0x7f.0x0.0x0.0x1",
    "0177.0.0.1",  # octal
    "0177.0000.0000.0001",
    "017700000001",  # octal, one part
    "127.000.000.001",
    "127.1",  # short forms
    "127.0.1",
    "0x7f.1",
    "127.0.0.1.",  # trailing dot
    "１２７.０.０.１",  # full-width digits
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[64:ff9b::127.0.0.1]",  # NAT64
    "[::127.0.0.1]",  # deprecated IPv4-compatible
    "0",  # 0.0.0.0 reaches local listeners on Linux
    "0.0.0.0",
    "0x0",
    "[::]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spelling_is_refused_and_the_listener_sees_no_connection(
    host: str, listener: Listener, sealed_net: SealedNet, tmp_path: Path
) -> None:
    with _fetcher() as f, pytest.raises(_url_error(host)) as info:
        f.fetch(f"http://{host}:{listener.port}/latest", tmp_path)
    assert str(info.value).startswith("refused http://")
    assert listener.arrivals() == 0
    assert sealed_net.connects == []
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_connect_time_guard_refuses_loopback_spelling_without_resolving_it(
    host: str, listener: Listener, sealed_net: SealedNet
) -> None:
    # The host as httpcore hands it to the backend: no brackets, no URL pre-check.
    with pytest.raises(RefusedAddress):
        netguard.GuardedBackend().connect_tcp(host.strip("[]"), listener.port, timeout=1.0)
    assert listener.arrivals() == 0
    assert sealed_net.connects == []
    assert sealed_net.lookups == []  # a literal is judged as written, never sent to DNS


def test_allowing_loopback_does_open_the_listener(listener: Listener, tmp_path: Path) -> None:
    # Control for the two tests above: the same listener is reachable when allowed, so
    # "no arrivals" there is the guard's doing and not a harness that cannot connect.
    with (
        _fetcher(allow_networks=("127.0.0.0/8",), timeout_s=0.3) as f,
        pytest.raises(FetchTimeout),  # the listener accepts but never answers
    ):
        f.fetch(f"http://0x7f.1:{listener.port}/", tmp_path)
    assert listener.arrivals() == 1


# --- every other non-public range, in many spellings --------------------------------------

FORBIDDEN = [
    # (host as written in the URL, the address it denotes, classify() reason)
    ("10.0.0.1", "10.0.0.1", "private"),
    ("10.1", "10.0.0.1", "private"),  # short form
    ("167772161", "10.0.0.1", "private"),  # decimal
    ("0xa000001", "10.0.0.1", "private"),  # hex
    ("0xa.0.0.1", "10.0.0.1", "private"),
    ("012.0.0.1", "10.0.0.1", "private"),  # octal
    ("172.16.0.1", "172.16.0.1", "private"),
    ("172.31.255.255", "172.31.255.255", "private"),
    ("0xac.0x10.0.1", "172.16.0.1", "private"),
    ("2886729729", "172.16.0.1", "private"),
    ("192.168.0.1", "192.168.0.1", "private"),
    ("192.168.1", "192.168.0.1", "private"),
    ("3232235521", "192.168.0.1", "private"),
    ("0xc0a80001", "192.168.0.1", "private"),
    ("0300.0250.0.1", "192.168.0.1", "private"),
    ("169.254.1.1", "169.254.1.1", "link_local"),
    ("[fe80::1]", "fe80::1", "link_local"),
    ("[fe80::1%25eth0]", "fe80::1%eth0", "link_local"),
    ("169.254.169.254", "169.254.169.254", "metadata"),
    ("169.254.43518", "169.254.169.254", "metadata"),
    ("2852039166", "169.254.169.254", "metadata"),
    ("0xa9fea9fe", "169.254.169.254", "metadata"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", "metadata"),
    ("0251.0376.0251.0376", "169.254.169.254", "metadata"),
    ("169.254.170.2", "169.254.170.2", "metadata"),
    ("100.100.100.200", "100.100.100.200", "metadata"),
    ("192.0.0.192", "192.0.0.192", "metadata"),
    ("[fd00:ec2::254]", "fd00:ec2::254", "metadata"),
    ("100.64.0.1", "100.64.0.1", "cgnat"),
    ("100.127.255.254", "100.127.255.254", "cgnat"),
    ("1681915905", "100.64.0.1", "cgnat"),
    ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1", "ipv4_mapped"),
    ("[::ffff:a00:1]", "::ffff:10.0.0.1", "ipv4_mapped"),
    ("[::ffff:192.168.0.1]", "::ffff:192.168.0.1", "ipv4_mapped"),
    ("[::ffff:100.64.0.1]", "::ffff:100.64.0.1", "ipv4_mapped"),
    ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254", "ipv4_mapped"),
    ("[64:ff9b::10.0.0.1]", "64:ff9b::a00:1", "nat64"),
    ("[64:ff9b::192.168.0.1]", "64:ff9b::c0a8:1", "nat64"),
    ("[64:ff9b::100.64.0.1]", "64:ff9b::6440:1", "nat64"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::169.254.169.254", "nat64"),
    ("[64:ff9b:1::a00:1]", "64:ff9b:1::a00:1", "nat64"),
    ("[2002:a9fe:a9fe::]", "2002:a9fe:a9fe::", "6to4"),
    ("[fd12:3456::1]", "fd12:3456::1", "unique_local"),
    ("[fc00::1]", "fc00::1", "unique_local"),
    ("[::10.0.0.1]", "::a00:1", "reserved"),
]


@pytest.mark.parametrize(("host", "address", "reason"), FORBIDDEN)
def test_forbidden_address_is_refused_by_every_layer_before_any_connect(
    host: str, address: str, reason: str, sealed_net: SealedNet, tmp_path: Path
) -> None:
    ip = ipaddress.ip_address(address)
    assert netguard.parse_host(host) == ip
    assert netguard.classify(ip) == reason

    url = f"http://{host}/latest/meta-data/"
    with pytest.raises(_url_error(host)):
        netguard.check_url(url, allow_private=False)
    with _fetcher() as f, pytest.raises(_url_error(host)):
        f.fetch(url, tmp_path)

    # The connect-time guard alone, as it sees the host when no URL check ran before it.
    with pytest.raises(RefusedAddress) as info:
        netguard.GuardedBackend().connect_tcp(host.strip("[]"), 80, timeout=1.0)
    assert netguard.explain(ip, reason) in str(info.value)
    assert sealed_net.connects == []
    assert sealed_net.lookups == []
    assert _leftovers(tmp_path) == []


METADATA_IN_IPV6 = [
    "::ffff:169.254.169.254",  # IPv4-mapped: a dual-stack socket reaches IMDS over IPv4
    "::ffff:100.100.100.200",
    "64:ff9b::169.254.169.254",  # NAT64
    "64:ff9b:1:a9fe:a9:fe00::",  # NAT64 local-use prefix, /48 layout
    "2002:a9fe:a9fe::",  # 6to4
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254
    "::169.254.169.254",  # IPv4-compatible
]


@pytest.mark.parametrize("address", METADATA_IN_IPV6)
def test_metadata_embedded_in_ipv6_stays_refused_when_private_ranges_are_allowed(
    address: str, sealed_net: SealedNet
) -> None:
    # allow_private opens 10/8 for a trusted deployment; it must not open IMDS by another name.
    ip = ipaddress.ip_address(address)
    assert netguard.targets_metadata(ip)
    assert not netguard.is_allowed(ip, allow_private=True)
    with pytest.raises(RefusedAddress, match="metadata addresses are refused even with"):
        netguard.check_url(f"http://[{address}]/latest/", allow_private=True)
    with pytest.raises(RefusedAddress, match="metadata addresses are refused even with"):
        netguard.GuardedBackend(allow_private=True).connect_tcp(address, 80, timeout=1.0)
    assert sealed_net.connects == []


# --- names whose answers are forbidden ------------------------------------------------------

NAMES = [
    ("localhost", ["127.0.0.1", "::1"], "loopback"),
    ("metadata.google.internal", ["169.254.169.254"], "cloud metadata"),
    ("instance-data.ec2.internal", ["fd00:ec2::254"], "cloud metadata"),
    ("db.corp.example", ["10.0.0.5"], "private"),
    ("router.example", ["192.168.1.1"], "private"),
    ("cgn.example", ["100.64.12.34"], "carrier-grade NAT"),
    ("mapped.example", ["::ffff:127.0.0.1"], "IPv4-mapped"),
    ("nat64.example", ["64:ff9b::a00:1"], "NAT64"),
    ("ula.example", ["fd12::1"], "unique-local"),
    ("link.example", ["fe80::1"], "link-local"),
]


@pytest.mark.parametrize(("name", "answer", "words"), NAMES)
def test_name_resolving_to_a_forbidden_address_is_refused_at_connect(
    name: str,
    answer: list[str],
    words: str,
    listener: Listener,
    sealed_net: SealedNet,
    tmp_path: Path,
) -> None:
    sealed_net.answer(name, answer)
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(f"http://{name}:{listener.port}/x", tmp_path)
    assert f"{name} resolves to" in str(info.value)
    assert words in str(info.value)
    assert sealed_net.lookups == [name]
    assert sealed_net.connects == []
    assert listener.arrivals() == 0


# --- DNS rebinding ----------------------------------------------------------------------------

REBIND_TO = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "::1", "fd00:ec2::254"]


@pytest.mark.parametrize("second", REBIND_TO)
def test_rebinding_name_is_resolved_once_and_the_vetted_address_is_connected(
    second: str, http_server: HttpServer, sealed_net: SealedNet, tmp_path: Path
) -> None:
    # First answer public (served locally by the stand-in), every later answer forbidden:
    # a guard that checked one answer and let the socket layer resolve again would connect
    # to `second`. This one resolves once and connects to the address it vetted.
    sealed_net.answer("rebind.example", [PUBLIC_IP], [second])
    http_server.routes["/m.png"] = _body(PNG)
    url = http_server.url("/m.png", host="rebind.example")
    with _fetcher() as f:
        got = f.fetch(url, tmp_path)
    assert got.sha256 == hashlib.sha256(PNG).hexdigest()
    assert sealed_net.lookups == ["rebind.example"]
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]

    # The next, fresh fetch sees the rebound answer and refuses it before any socket.
    with _fetcher() as f, pytest.raises(RefusedAddress, match=r"rebind\.example resolves to"):
        f.fetch(url, tmp_path)
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]
    assert http_server.requests == ["/m.png"]


def test_rebinding_between_redirect_hops_is_caught_on_the_second_hop(
    http_server: HttpServer, sealed_net: SealedNet, tmp_path: Path
) -> None:
    # Each hop opens a new connection (the server closes them), so each hop resolves anew
    # and is judged anew: same name, now answering loopback.
    sealed_net.answer("hop.example", [PUBLIC_IP], ["127.0.0.1"])
    http_server.routes["/a"] = _redirect(http_server.url("/b", host="hop.example"))
    http_server.routes["/b"] = _body(PNG)
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(http_server.url("/a", host="hop.example"), tmp_path)
    assert "hop.example resolves to 127.0.0.1, a loopback address" in str(info.value)
    assert "(redirected from http://hop.example:" in str(info.value)
    assert http_server.requests == ["/a"]
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]


# --- redirects --------------------------------------------------------------------------------

# First hop on 127.0.0.1, allowed by naming exactly 127.0.0.0/8; the redirect leaves it.
FROM_ALLOWED_LOOPBACK = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.0.0.1/",
    "http://10.1/",
    "http://172.16.0.1/",
    "http://192.168.1/",
    "http://100.64.0.1/",
    "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::10.0.0.1]/",
    "http://[fe80::1%25eth0]/",
    "http://[::1]:{port}/",  # loopback, but not inside the allowed IPv4 network
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://db.corp.example/",
    "//169.254.169.254/latest/",  # scheme-relative
]


@pytest.mark.parametrize("target", FROM_ALLOWED_LOOPBACK)
def test_redirect_from_an_allowed_first_hop_to_a_forbidden_one_is_refused(
    target: str, http_server: HttpServer, sealed_net: SealedNet, tmp_path: Path
) -> None:
    sealed_net.answer("metadata.google.internal", ["169.254.169.254"])
    sealed_net.answer("db.corp.example", ["10.0.0.5"])
    http_server.routes["/hop"] = _redirect(target.format(port=http_server.port))
    with (
        _fetcher(allow_networks=("127.0.0.0/8",)) as f,
        pytest.raises(RefusedAddress) as info,
    ):
        f.fetch(http_server.url("/hop"), tmp_path)
    assert f"(redirected from {http_server.url('/hop')})" in str(info.value)
    assert http_server.requests == ["/hop"]
    assert sealed_net.connects == [("127.0.0.1", http_server.port)]
    assert _leftovers(tmp_path) == []


# First hop a public-looking host; nothing non-public is allowed, so loopback spellings
# aimed at the listener are forbidden second hops.
FROM_PUBLIC = [
    "http://127.0.0.1:{lport}/",
    "http://2130706433:{lport}/",
    "http://0x7f000001:{lport}/",
    "http://0x7f.0.0.1:{lport}/",
    "http://017700000001:{lport}/",
    "http://127.1:{lport}/",
    "http://0:{lport}/",
    "http://127.0.0.1.:{lport}/",
    "http://[::ffff:127.0.0.1]:{lport}/",
    "http://localhost:{lport}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
]


@pytest.mark.parametrize("target", FROM_PUBLIC)
def test_redirect_from_a_public_first_hop_to_loopback_never_reaches_the_listener(
    target: str,
    http_server: HttpServer,
    listener: Listener,
    sealed_net: SealedNet,
    tmp_path: Path,
) -> None:
    sealed_net.answer("cdn.example", [PUBLIC_IP])
    sealed_net.answer("localhost", ["127.0.0.1"])
    http_server.routes["/hop"] = _redirect(target.format(lport=listener.port))
    with _fetcher() as f, pytest.raises(RefusedAddress) as info:
        f.fetch(http_server.url("/hop", host="cdn.example"), tmp_path)
    assert "redirected from http://cdn.example:" in str(info.value)
    assert listener.arrivals() == 0
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "status",
    ["301 Moved Permanently", "302 Found", "303 See Other", "307 Temporary Redirect", "308 X"],
)
def test_every_redirect_status_is_rechecked(
    status: str, http_server: HttpServer, sealed_net: SealedNet, tmp_path: Path
) -> None:
    sealed_net.answer("cdn.example", [PUBLIC_IP])
    http_server.routes["/hop"] = _redirect("http://169.254.169.254/latest/", status)
    with _fetcher() as f, pytest.raises(RefusedAddress, match="cloud metadata address"):
        f.fetch(http_server.url("/hop", host="cdn.example"), tmp_path)
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]


def test_backend_used_without_the_fetcher_refuses_a_redirect_it_is_told_to_follow(
    http_server: HttpServer, sealed_net: SealedNet
) -> None:
    # Even a caller that turns on httpx's own redirect following goes through the guarded
    # backend on every hop.
    sealed_net.answer("cdn.example", [PUBLIC_IP])
    http_server.routes["/hop"] = _redirect("http://0xa9fea9fe/latest/")
    with netguard.guarded_client() as client, pytest.raises(RefusedAddress):
        client.get(http_server.url("/hop", host="cdn.example"), follow_redirects=True)
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]


def test_injected_resolver_is_the_only_resolution_the_backend_makes(
    http_server: HttpServer, sealed_net: SealedNet
) -> None:
    # guarded_client(resolver=...) is the seam a caller uses for its own DNS; its answer
    # is judged and connected to, and nothing else is asked.
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.9.8.7", port))]

    with (
        netguard.guarded_client(resolver=resolver) as client,
        pytest.raises(RefusedAddress, match=r"media\.example resolves to 10\.9\.8\.7"),
    ):
        client.get(http_server.url("/x", host="media.example"))
    assert asked == ["media.example"]
    assert sealed_net.connects == []


# --- what a refusal shows -------------------------------------------------------------------

SECRET = "S3CR3T"

LEAKY_URLS = [
    f"http://alice:{SECRET}@10.0.0.1/a.mp4",
    f"http://alice:{SECRET}@169.254.169.254/",
    f"http://{SECRET}@127.0.0.1/",
    f"http://alice:pa/{SECRET}@10.0.0.1/",  # unescaped "/" in the password
    f"http://alice:pa?{SECRET}@10.0.0.1/",  # unescaped "?"
    f"http://alice:pa#{SECRET}@10.0.0.1/",  # unescaped "#"
    f"http://alice:{SECRET}:x@10.0.0.1/",
    f"http:alice:{SECRET}@10.0.0.1/",  # no slashes: lenient parsers still see userinfo
    f"http://10.0.0.1/a.mp4?X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA{SECRET}",
    f"http://10.0.0.1/a.mp4?X%2DAmz%2DSignature={SECRET}",
    f"http://10.0.0.1/a.mp4?%73ig={SECRET}",  # percent-encoded name
    f"http://10.0.0.1/a.mp4?sv=2024&sig={SECRET}",  # Azure SAS
    f"http://10.0.0.1/a.mp4?a=1;token={SECRET}",  # ";" separator
    f"http://10.0.0.1/a.mp4?Signature={SECRET}&Key-Pair-Id=K{SECRET}",  # CloudFront
    f"http://10.0.0.1/a.mp4#access_token={SECRET}",
]


@pytest.mark.parametrize("url", LEAKY_URLS)
def test_refusals_never_show_credentials_or_signatures(
    url: str, sealed_net: SealedNet, tmp_path: Path
) -> None:
    with _fetcher() as f, pytest.raises((RefusedAddress, InvalidRef)) as info:
        f.fetch(url, tmp_path)
    assert SECRET not in str(info.value)
    assert SECRET not in redact_url(url)
    assert sealed_net.connects == []


@pytest.mark.parametrize(
    "location",
    [
        f"http://169.254.169.254/latest?X-Amz-Signature={SECRET}",
        f"http://alice:{SECRET}@10.0.0.1/",
        f"http://alice:pa/{SECRET}@10.0.0.1/",
    ],
)
def test_redirect_refusals_never_show_secrets_of_either_hop(
    location: str, http_server: HttpServer, sealed_net: SealedNet, tmp_path: Path
) -> None:
    sealed_net.answer("cdn.example", [PUBLIC_IP])
    http_server.routes["/hop"] = _redirect(location)
    first = http_server.url(f"/hop?X-Goog-Signature={SECRET}&id=7", host="cdn.example")
    with _fetcher() as f, pytest.raises((RefusedAddress, InvalidRef)) as info:
        f.fetch(first, tmp_path)
    message = str(info.value)
    assert SECRET not in message
    assert "X-Goog-Signature=REDACTED&id=7" in message
    assert sealed_net.connects == [(PUBLIC_IP, http_server.port)]
