"""The webhook sink against a real HTTP server on 127.0.0.1: what a receiver sees (body,
signature, idempotency key, HEC token), what is retried and what is not, and that no
credential reaches an error or a log line."""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from synthwatch.errors import DeliveryFailed, InvalidInput, is_permanent
from synthwatch.operators import siem
from synthwatch.operators.webhook import (
    Attempt,
    SinkSettings,
    WebhookSink,
    shown_endpoint,
    sign,
    verify_signature,
)
from synthwatch.pipeline import logs
from synthwatch.schemas import Alert, Segment

SECRET = "whsec-9f8e7d6c5b4a"
TOKEN = "11112222-hec-token-33334444"


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"text":"Success","code":0}'
    delay_s: float = 0.0
    echo: bool = False
    """Answer with the request's path and headers, as some servers' error pages do."""


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Hook:
    """A scripted HTTP server: answers each request with the next `Reply` (200 when the
    script is used up) and records every request it gets."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else b""
                with hook._lock:
                    hook.seen.append(
                        Seen(
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                    reply = hook.script.pop(0) if hook.script else Reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = reply.body
                if reply.echo:
                    payload = json.dumps(
                        {"path": self.path, "headers": dict(self.headers)}
                    ).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the read-timeout test)

            do_POST = _handle
            do_GET = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def _alert(**kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "alert_id": "0123456789abcdef0123456789abcdef",
        "id": "media-1",
        "url": "https://cdn.example.org/clips/v.mp4",
        "sha256": "a1" * 32,
        "media_type": "video",
        "synthetic_score": 0.91,
        "decision": "flag",
        "model_set": "0123456789abcdef",
        "policy_version": "policy.v1",
        "evidence_uri": "s3://synthwatch/evidence/0123/manifest.json",
        "manifest_sha256": "b2" * 32,
        "segments": [Segment(start_s=1.0, end_s=2.0, score=0.9)],
        "detected_at": 1_712_345_678.5,
    }
    fields.update(kw)
    return Alert(**fields)


class Recorder:
    """Injected `sleep` and `on_attempt`: records instead of waiting."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.attempts: list[Attempt] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def on_attempt(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)


def _sink(url: str, rec: Recorder, **kw: Any) -> WebhookSink:
    settings = SinkSettings(
        url=url,
        **{"backoff_s": 1.0, "backoff_max_s": 60.0, "max_attempts": 4, "timeout_s": 5.0, **kw},
    )
    return WebhookSink(settings, sleep=rec.sleep, on_attempt=rec.on_attempt, rng=random.Random(7))


def _outcomes(rec: Recorder) -> list[str]:
    return [a.outcome for a in rec.attempts]


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- what a receiver gets --------------------------------------------------------------


def test_a_delivered_alert_is_signed_and_carries_its_idempotency_key(hook: Hook) -> None:
    rec, alert = Recorder(), _alert()
    with _sink(hook.url(), rec, secret=SECRET, splunk_token=TOKEN) as sink:
        delivery = sink.deliver(alert)
    assert delivery.status == 200 and delivery.alert_id == alert.alert_id
    assert _outcomes(rec) == ["delivered"] and list(delivery.attempts) == rec.attempts
    (req,) = hook.seen
    assert (req.method, req.path) == ("POST", "/hook")
    assert req.headers["content-type"] == "application/json"
    assert req.headers["idempotency-key"] == req.headers["x-synthwatch-alert-id"] == alert.alert_id
    assert req.body == siem.format_alert(alert, "ocsf")
    assert json.loads(req.body)["finding_info"]["uid"] == alert.alert_id
    assert "authorization" not in req.headers  # the HEC token goes to HEC only

    ts, sig = req.headers["x-synthwatch-timestamp"], req.headers["x-synthwatch-signature"]
    assert abs(int(ts) - time.time()) < 60
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature(SECRET, ts, req.body, sig)
    assert verify_signature(SECRET.encode(), ts, req.body, sig)
    assert not verify_signature("another-secret", ts, req.body, sig)
    assert not verify_signature(SECRET, ts, req.body.replace(b"video", b"image"), sig)
    assert not verify_signature(SECRET, ts, req.body + b" ", sig)
    assert not verify_signature(SECRET, str(int(ts) + 1), req.body, sig)
    assert not verify_signature(SECRET, ts, req.body, sig.upper())
    assert not verify_signature(SECRET, ts, req.body, sig.removeprefix("sha256="))
    assert not verify_signature(SECRET, "-5", req.body, sig)
    assert not verify_signature(SECRET, "", req.body, sig)


def test_a_stale_or_future_timestamp_is_rejected() -> None:
    body, ts = b'{"a":1}', "1700000000"
    sig = sign(SECRET, ts, body)
    assert verify_signature(SECRET, ts, body, sig, now=1_700_000_000 + 300)
    assert not verify_signature(SECRET, ts, body, sig, now=1_700_000_000 + 301)
    assert not verify_signature(SECRET, ts, body, sig, now=1_700_000_000 - 301)
    assert verify_signature(SECRET, ts, body, sig, now=1_700_000_000 + 3000, tolerance_s=3600)


def test_the_signature_scheme_is_the_documented_one() -> None:
    import hashlib
    import hmac

    body, ts = b'{"x":"y"}', "1712345678"
    expected = hmac.new(SECRET.encode(), b"1712345678." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, ts, body) == f"sha256={expected}"


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
def test_without_a_secret_nothing_is_signed(hook: Hook, secret: str | None) -> None:
    rec = Recorder()
    with _sink(hook.url(), rec, secret=secret) as sink:
        sink.deliver(_alert())
    (req,) = hook.seen
    assert "x-synthwatch-signature" not in req.headers
    assert "x-synthwatch-timestamp" not in req.headers
    assert req.headers["idempotency-key"] == _alert().alert_id


def test_splunk_hec_gets_its_token_and_envelope(hook: Hook) -> None:
    rec, alert = Recorder(), _alert()
    with _sink(
        hook.url("/services/collector/event"),
        rec,
        format="splunk_hec",
        splunk_token=TOKEN,
        splunk_index="soc",
        splunk_sourcetype="ocsf:finding",
    ) as sink:
        sink.deliver(alert)
    (req,) = hook.seen
    assert req.path == "/services/collector/event"
    assert req.headers["authorization"] == f"Splunk {TOKEN}"
    envelope = json.loads(req.body)
    assert envelope["index"] == "soc" and envelope["sourcetype"] == "ocsf:finding"
    assert envelope["time"] == 1_712_345_678.5
    assert envelope["event"]["class_uid"] == 2004
    assert req.body == siem.format_alert(
        alert, "splunk_hec", sourcetype="ocsf:finding", index="soc"
    )


def test_native_format_posts_the_alert_record(hook: Hook) -> None:
    with _sink(hook.url(), Recorder(), format="native") as sink:
        sink.deliver(_alert())
    assert json.loads(hook.seen[0].body)["type"] == "alert.v2"


# --- retries ---------------------------------------------------------------------------


def test_503_is_retried_with_backoff_then_delivered(hook: Hook) -> None:
    hook.script = [Reply(503), Reply(503), Reply(200)]
    rec = Recorder()
    ticks = iter([1_700_000_000.0, 1_700_000_010.0, 1_700_000_030.0])
    settings = SinkSettings(url=hook.url(), secret=SECRET, backoff_s=1.0, backoff_max_s=60.0)
    with WebhookSink(
        settings, sleep=rec.sleep, on_attempt=rec.on_attempt, clock=lambda: next(ticks)
    ) as sink:
        delivery = sink.deliver(_alert())
    assert len(hook.seen) == 3  # the server saw every attempt
    assert _outcomes(rec) == ["retried", "retried", "delivered"]
    assert [a.status for a in rec.attempts] == [503, 503, 200]
    assert rec.attempts[0].detail.startswith("HTTP 503")
    assert len(delivery.attempts) == 3
    # Full jitter: uniform in [0, base * 2^(n-1)], the delays the sink reports it slept.
    assert len(rec.sleeps) == 2 and 0 <= rec.sleeps[0] <= 1.0 and 0 <= rec.sleeps[1] <= 2.0
    assert rec.sleeps == [a.delay_s for a in rec.attempts[:2]]
    # The same body and key every time; each attempt signed with its own timestamp.
    assert len({r.body for r in hook.seen}) == 1
    assert {r.headers["idempotency-key"] for r in hook.seen} == {_alert().alert_id}
    stamps = [r.headers["x-synthwatch-timestamp"] for r in hook.seen]
    assert stamps == ["1700000000", "1700000010", "1700000030"]
    for r in hook.seen:
        ts = r.headers["x-synthwatch-timestamp"]
        assert verify_signature(
            SECRET, ts, r.body, r.headers["x-synthwatch-signature"], now=int(ts)
        )


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
def test_other_transient_statuses_are_retried(hook: Hook, status: int) -> None:
    hook.script = [Reply(status), Reply(200)]
    rec = Recorder()
    with _sink(hook.url(), rec) as sink:
        sink.deliver(_alert())
    assert _outcomes(rec) == ["retried", "delivered"] and len(hook.seen) == 2


def test_retry_after_seconds_is_honoured_and_capped(hook: Hook) -> None:
    hook.script = [
        Reply(429, {"Retry-After": "7"}),
        Reply(503, {"Retry-After": "120"}),
        Reply(200),
    ]
    rec = Recorder()
    with _sink(hook.url(), rec, backoff_max_s=30.0) as sink:
        sink.deliver(_alert())
    assert rec.sleeps == [7.0, 30.0]
    assert len(hook.seen) == 3


def test_retry_after_as_a_date_falls_back_to_backoff(hook: Hook) -> None:
    hook.script = [Reply(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), Reply(200)]
    rec = Recorder()
    with _sink(hook.url(), rec, backoff_s=0.5) as sink:
        sink.deliver(_alert())
    assert len(rec.sleeps) == 1 and 0.0 <= rec.sleeps[0] <= 0.5


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_a_client_error_is_permanent_and_not_retried(hook: Hook, status: int) -> None:
    hook.script = [Reply(status, body=b'{"text":"Invalid data format","code":6}')]
    rec = Recorder()
    with _sink(hook.url(), rec) as sink, pytest.raises(DeliveryFailed) as info:
        sink.deliver(_alert())
    assert len(hook.seen) == 1 and rec.sleeps == []
    assert _outcomes(rec) == ["dead_lettered"]
    exc = info.value
    assert exc.reason == "delivery" and is_permanent(exc)
    assert exc.status == status and exc.alert_id == _alert().alert_id
    assert f"HTTP {status}" in str(exc) and "not retried" in str(exc)
    assert "Invalid data format" in str(exc)  # what the receiver said helps the operator


def test_gives_up_after_max_attempts(hook: Hook) -> None:
    hook.script = [Reply(500) for _ in range(10)]
    rec = Recorder()
    with _sink(hook.url(), rec, max_attempts=4) as sink, pytest.raises(DeliveryFailed) as info:
        sink.deliver(_alert())
    assert len(hook.seen) == 4 and len(rec.sleeps) == 3
    assert _outcomes(rec) == ["retried", "retried", "retried", "dead_lettered"]
    assert is_permanent(info.value) and info.value.reason == "delivery"
    assert "after 4 attempt(s) (retries exhausted): HTTP 500" in str(info.value)
    assert info.value.attempts == tuple(rec.attempts)


def test_connection_refused_is_retried_then_dead_lettered() -> None:
    rec = Recorder()
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    with _sink(url, rec, max_attempts=3) as sink, pytest.raises(DeliveryFailed) as info:
        sink.deliver(_alert())
    assert _outcomes(rec) == ["retried", "retried", "dead_lettered"]
    assert [a.status for a in rec.attempts] == [None, None, None]
    assert {a.detail for a in rec.attempts} == {"ConnectError"}
    assert len(rec.sleeps) == 2
    assert info.value.status is None and is_permanent(info.value)


def test_a_read_timeout_is_retried(hook: Hook) -> None:
    hook.script = [Reply(200, delay_s=1.5), Reply(200)]
    rec = Recorder()
    with _sink(hook.url(), rec, timeout_s=0.4) as sink:
        sink.deliver(_alert())
    assert _outcomes(rec) == ["retried", "delivered"]
    assert rec.attempts[0].detail == "ReadTimeout"
    assert len(hook.seen) == 2


def test_a_redirect_is_not_followed(hook: Hook) -> None:
    hook.script = [Reply(302, {"Location": hook.url("/elsewhere")})]
    rec = Recorder()
    with _sink(hook.url(), rec, secret=SECRET) as sink, pytest.raises(DeliveryFailed) as info:
        sink.deliver(_alert())
    assert [r.path for r in hook.seen] == ["/hook"]  # no second request anywhere
    assert _outcomes(rec) == ["dead_lettered"] and rec.sleeps == []
    assert is_permanent(info.value) and info.value.status == 302
    assert "redirects are not followed" in str(info.value)


# --- secrets ---------------------------------------------------------------------------


@pytest.mark.usefixtures("configured_logging")
@pytest.mark.parametrize("fmt", ["ocsf", "splunk_hec"])
def test_no_credential_reaches_an_error_or_a_log_line(
    hook: Hook, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path_secret, query_secret, password = "T0KENPATH77", "qu3rys3cret", "pa55w0rdX"
    url = f"http://svc:{password}@127.0.0.1:{hook.port}/hooks/{path_secret}?token={query_secret}"
    basic = base64.b64encode(f"svc:{password}".encode()).decode()
    secrets = (SECRET, TOKEN, path_secret, query_secret, password, basic)
    # The receiver echoes the request's path and headers back, as some error pages do.
    hook.script = [Reply(503, echo=True), Reply(401, echo=True)]
    logs.configure("DEBUG", json=True)
    for name in ("httpx", "httpcore"):  # let even the transport's own lines through
        logging.getLogger(name).setLevel(logging.DEBUG)
    rec = Recorder()
    with (
        _sink(url, rec, secret=SECRET, splunk_token=TOKEN, format=fmt) as sink,
        pytest.raises(DeliveryFailed) as info,
    ):
        sink.deliver(_alert())
    assert len(hook.seen) == 2
    sent = hook.seen[0]
    assert sent.path == f"/hooks/{path_secret}?token={query_secret}"  # the real URL was used
    assert any(s in json.dumps(sent.headers) for s in (TOKEN, basic))  # and credentials sent
    err = capsys.readouterr().err
    shown = [
        ("the error", str(info.value)),
        ("the error's repr", repr(info.value)),
        ("the attempts", repr(info.value.attempts)),
        ("the log", err),
    ]
    for what, text in shown:
        for secret in secrets:
            assert secret not in text, f"{secret!r} in {what}: {text}"
    # The lines are still useful: the events, the endpoint's origin, what the server said.
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {"sink.retry", "sink.dead_lettered"} <= {e["event"] for e in events}
    assert "HTTP Request: POST http://127.0.0.1" in err  # httpx's line, rewritten
    assert f"http://127.0.0.1:{hook.port}/..." in str(info.value)
    assert "HTTP 401" in str(info.value) and "REDACTED" in str(info.value)


def test_shown_endpoint_is_the_origin_only() -> None:
    assert shown_endpoint("https://u:p@hooks.example.org/services/T0/B1/xyz?sig=1") == (
        "https://hooks.example.org/..."
    )
    assert shown_endpoint("http://127.0.0.1:8088") == "http://127.0.0.1:8088"
    assert shown_endpoint("http://[::1]:8088/x") == "http://[::1]:8088/..."


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "no endpoint"),
        ("ftp://files.example.org/T0KENPATH77", "http:// or https://"),
        ("http://", "valid URL|with a host"),
    ],
)
def test_an_unusable_endpoint_is_refused_at_construction(url: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        WebhookSink(SinkSettings(url=url))
    assert "T0KENPATH77" not in str(info.value)
