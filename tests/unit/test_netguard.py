"""netguard: address classification, host normalisation, URL checks and redaction.

Nothing here opens a socket to anything but 127.0.0.1: refusals of other ranges are
shown on the classifier and URL checker directly (connect-time behaviour is exercised,
with connects intercepted, in test_fetch.py).
"""

from __future__ import annotations

import ipaddress

import pytest

from synthwatch.errors import InvalidRef, RefusedAddress
from synthwatch.operators import netguard
from synthwatch.operators.netguard import classify, parse_host
from synthwatch.operators.redact import redact_url


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.1.2", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("100.100.100.200", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("168.63.129.16", "metadata"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this_network"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.10", "documentation"),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmark"),
        ("fd12:3456::1", "unique_local"),
        ("fc00::1", "unique_local"),
        ("fec0::1", "site_local"),
        ("::ffff:127.0.0.1", "ipv4_mapped"),
        ("::ffff:169.254.169.254", "ipv4_mapped"),
        ("::ffff:10.0.0.1", "ipv4_mapped"),
        ("64:ff9b::7f00:1", "nat64"),  # 64:ff9b::127.0.0.1
        ("64:ff9b::a9fe:a9fe", "nat64"),  # 64:ff9b::169.254.169.254
        ("64:ff9b:1::a00:1", "nat64"),  # local-use prefix, /96 layout of 10.0.0.1
        ("2002:7f00:1::", "6to4"),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", "6to4"),  # 6to4 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo"),  # client 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused_with_their_reason(address: str, reason: str) -> None:
    assert classify(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "172.32.0.1",  # just outside 172.16.0.0/12
        "100.128.0.1",  # just outside CGNAT
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",  # mapped public v4 reaches a public host
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert classify(ipaddress.ip_address(address)) is None


def test_metadata_stays_refused_when_private_addresses_are_allowed() -> None:
    imds = ipaddress.ip_address("169.254.169.254")
    assert not netguard.is_allowed(imds, allow_private=True)
    assert netguard.is_allowed(ipaddress.ip_address("10.0.0.1"), allow_private=True)
    assert not netguard.is_allowed(ipaddress.ip_address("10.0.0.1"), allow_private=False)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),  # decimal
        ("0x7f000001", "127.0.0.1"),  # hex
        ("0X7F.0.0.1", "127.0.0.1"),  # hex part
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("017700000001", "127.0.0.1"),  # octal, one part
        ("127.1", "127.0.0.1"),  # short form
        ("10.1", "10.0.0.1"),
        ("169.254.43518", "169.254.169.254"),  # a.b.c16
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),  # trailing dot
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("[::1]", "::1"),
        ("[FD00:EC2::254]", "fd00:ec2::254"),
        ("１２７.０.０.１", "127.0.0.1"),  # full-width digits, NFKC via IDNA
        ("127。0。0。1", "127.0.0.1"),  # ideographic full stops
    ],
)
def test_ip_literal_spellings_normalise_to_the_address_libc_connects_to(
    host: str, address: str
) -> None:
    assert parse_host(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "localhost", "127.0.0.1.nip.io", "1.2.3.4 x"])
def test_dns_names_are_not_literals(host: str) -> None:
    assert parse_host(host) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0x7f000001/x",
        "http://127.1:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://127.0.0.1./",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "https://169.254.169.254/latest",
        "http://[fd00:ec2::254]/",
    ],
)
def test_literal_hosts_are_refused_before_any_connection(url: str) -> None:
    with pytest.raises(RefusedAddress, match="refused http"):
        netguard.check_url(url, allow_private=False)


def test_octal_host_is_refused_even_though_httpx_rejects_it() -> None:
    # httpx refuses leading zeros outright; either way it never reaches a socket.
    with pytest.raises((RefusedAddress, InvalidRef)):
        netguard.check_url("http://0177.0.0.1/", allow_private=False)


def test_refusal_message_names_the_address_and_the_switch() -> None:
    with pytest.raises(RefusedAddress) as info:
        netguard.check_url("http://10.0.0.7/x", allow_private=False)
    message = str(info.value)
    assert message.startswith("refused http://10.0.0.7/x: 10.0.0.7 is a private")
    assert "SYNTHWATCH_FETCH__ALLOW_PRIVATE=true" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    ["http://user:pass@example.com/a.mp4", "https://token@example.com/", "http://:pw@example.com/"],
)
def test_urls_with_credentials_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(InvalidRef) as info:
        netguard.check_url(url, allow_private=False)
    assert "pass" not in str(info.value).replace("password", "")
    assert "token@" not in str(info.value)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://example.com/a", "gopher://example.com/", "file:///etc/x"])
def test_non_http_schemes_are_refused(url: str) -> None:
    with pytest.raises(InvalidRef, match="is not fetched"):
        netguard.check_url(url, allow_private=False)


def test_public_name_passes_the_precheck_and_is_judged_at_connect_time() -> None:
    assert netguard.check_url("https://example.com/a.mp4", allow_private=False).host == (
        "example.com"
    )


def test_redact_url_drops_credentials_signatures_and_fragment() -> None:
    url = (
        "https://alice:s3cret@bucket.s3.amazonaws.com/k.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef&sig=abc&token=t0k&size=large#frag"
    )
    shown = redact_url(url)
    for secret in ("alice", "s3cret", "AKIA123", "deadbeef", "abc", "t0k", "frag"):
        assert secret not in shown
    assert shown.startswith("https://***@bucket.s3.amazonaws.com/k.mp4?")
    assert "size=large" in shown
    assert "X-Amz-Signature=REDACTED" in shown


def test_unix_sockets_are_refused() -> None:
    with pytest.raises(RefusedAddress):
        netguard.GuardedBackend().connect_unix_socket("/var/run/docker.sock")


def test_allow_networks_opens_only_the_named_range_and_never_metadata() -> None:
    from ipaddress import ip_address

    from synthwatch.operators.netguard import is_allowed, parse_networks

    nets = parse_networks(["127.0.0.0/8", "10.20.0.0/16", "169.254.0.0/16"])
    assert is_allowed(ip_address("127.0.0.1"), allow_private=False, allow_networks=nets)
    assert is_allowed(ip_address("10.20.3.4"), allow_private=False, allow_networks=nets)
    assert not is_allowed(ip_address("10.21.0.1"), allow_private=False, allow_networks=nets)
    assert not is_allowed(ip_address("192.168.1.1"), allow_private=False, allow_networks=nets)
    assert not is_allowed(ip_address("169.254.169.254"), allow_private=False, allow_networks=nets)
    assert not is_allowed(ip_address("::1"), allow_private=False, allow_networks=nets)


def test_a_malformed_allowed_network_is_a_clear_error() -> None:
    from synthwatch.errors import InvalidRef
    from synthwatch.operators.netguard import parse_networks

    with pytest.raises(InvalidRef, match="not a CIDR"):
        parse_networks(["10.0.0.0/33"])
