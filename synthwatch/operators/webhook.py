"""Deliver alerts to a webhook: a SOAR, a ticketing system, Splunk's HTTP Event Collector.

`WebhookSink.deliver(alert)` POSTs the alert in the configured format (`operators/siem.py`)
and retries what a retry can fix:

- 2xx: delivered.
- 408, 429, 5xx, and transport errors (connection refused or reset, connect/read/write
  timeouts): retried, up to `max_attempts` attempts in all, after a capped exponential
  backoff with full jitter (`operators/backoff.py`), or after the response's
  `Retry-After` when it gives seconds (RFC 9110 section 10.2.3: `delay-seconds`), capped
  at `backoff_max_s`. The HTTP-date form of `Retry-After` falls back to the backoff.
- 3xx: redirects are never followed (the body, its signature and the HEC token stay with
  the configured endpoint); permanent, like any other 4xx (400, 401, 403, 404, 413, ...).

A permanent failure or the last failed attempt raises `DeliveryFailed` (reason
`delivery`, permanent: the sink has already retried, so the caller dead-letters the alert
instead of retrying it again). Every attempt's outcome (`delivered`, `retried`,
`dead_lettered`) goes to the `on_attempt` callback and is in the returned `Delivery` or
the raised error, for the `synthwatch_sink_deliveries_total{format, outcome}` counter.

Headers on every POST:

- `Content-Type: application/json`
- `Idempotency-Key` and `X-Synthwatch-Alert-Id`: the alert's deterministic `alert_id`,
  the same on every attempt and every redelivery, so a receiver can drop duplicates.
- `Authorization: Splunk <token>` in the `splunk_hec` format when `splunk_token` is set
  (Splunk docs, "Format events for HTTP Event Collector": HTTP authentication). The token
  is never sent in the other formats, whatever the settings say.
- With `secret` set, a signature a receiver can check (`verify_signature` does):

      X-Synthwatch-Timestamp: <unix seconds, decimal integer>
      X-Synthwatch-Signature: sha256=<hex HMAC-SHA256(key=secret, msg=timestamp + "." + body)>

  where `body` is the exact request body bytes and the key is the secret's UTF-8 bytes.
  The timestamp is taken per attempt, so a retry after a long backoff is not stale. A
  receiver recomputes the HMAC over the raw body it received, compares in constant time,
  and rejects timestamps more than five minutes from its own clock (replays); the
  `Idempotency-Key` then catches a replay inside that window.

Nothing this module logs or raises contains the secret, the token, or the endpoint's
credentials, path or query: many webhook URLs (Slack, Teams, signed HEC URLs) carry a
credential in the path or query, so the endpoint is shown as its origin only
(`https://hooks.example.org/...`), and httpx's own request log lines for the endpoint are
rewritten the same way. A response body quoted in an error is scrubbed of all of those.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

import synthwatch
from synthwatch.errors import DeliveryFailed, InvalidInput
from synthwatch.operators.backoff import backoff
from synthwatch.operators.redact import REDACTED, redact_url, redact_urls
from synthwatch.operators.siem import Format, format_alert
from synthwatch.schemas import Alert


class SinkSettings(BaseModel):
    """The alert sink (`synthwatch worker --role sink`): reads `media.alerts` and POSTs
    each alert to a webhook (a SOAR, a ticketing system, Splunk's HTTP Event Collector)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    """Where alerts are POSTed; the sink role refuses to start without it."""
    format: Literal["native", "ocsf", "splunk_hec"] = "ocsf"
    """native: the alert.v2 record; ocsf: an OCSF Detection Finding (class 2004);
    splunk_hec: an HEC event envelope around the OCSF finding."""
    secret: SecretStr | None = None
    """HMAC-SHA256 key for the signature header; unsigned when unset."""
    splunk_token: SecretStr | None = None
    """HEC token, sent as `Authorization: Splunk <token>` (splunk_hec only)."""
    splunk_index: str | None = None
    splunk_sourcetype: str = "synthwatch:alert"
    max_attempts: int = 6
    """Delivery attempts per alert before it is dead-lettered (reason `delivery`)."""
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 10.0


Outcome = Literal["delivered", "retried", "dead_lettered"]

SIGNATURE_HEADER = "X-Synthwatch-Signature"
TIMESTAMP_HEADER = "X-Synthwatch-Timestamp"
ALERT_ID_HEADER = "X-Synthwatch-Alert-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_TOLERANCE_S = 300
RETRYABLE_STATUS = frozenset({408, 429})
"""Besides every 5xx: request timeout and too many requests."""
_BODY_SNIPPET_CHARS = 200
_BODY_READ_BYTES = 4096
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Attempt:
    """One POST and what came of it."""

    number: int
    """1 for the first attempt."""
    outcome: Outcome
    format: Format
    status: int | None
    """The HTTP status; None when no response came (refused, timed out, reset)."""
    detail: str
    """What happened, safe to show: `HTTP 503`, `ConnectError`, ..."""
    delay_s: float = 0.0
    """For `retried`: the wait before the next attempt."""


@dataclass(frozen=True)
class Delivery:
    """A delivered alert."""

    alert_id: str
    status: int
    attempts: tuple[Attempt, ...]


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The `X-Synthwatch-Signature` value: `sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `header` (the `X-Synthwatch-Signature` value) signs `body` at `timestamp`
    (the `X-Synthwatch-Timestamp` value) with `secret`, and the timestamp is within
    `tolerance_s` of `now` (default: this machine's clock), in either direction."""
    if not _DIGITS.fullmatch(timestamp):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(header.encode(), sign(secret, timestamp, body).encode())


def shown_endpoint(url: str) -> str:
    """The endpoint as logs and errors show it: scheme, host and port only."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<sink url>"
    host = parsed.host
    if ":" in host:
        host = f"[{host}]"
    port = f":{parsed.port}" if parsed.port is not None else ""
    rest = "/..." if parsed.raw_path not in (b"", b"/") else ""
    return f"{parsed.scheme}://{host}{port}{rest}"


class _HideEndpoint(logging.Filter):
    """Rewrites the endpoint's URL in httpx's log records ("HTTP Request: POST <url> ...",
    at INFO) to `shown_endpoint`. Also matches the `redact_url` form, in case the fetcher's
    filter on the same logger ran first."""

    def __init__(self, url: str, shown: str) -> None:
        super().__init__()
        full = str(httpx.URL(url))
        self._forms = sorted({full, redact_url(full), url}, key=len, reverse=True)
        self._shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = message
        for form in self._forms:
            hidden = hidden.replace(form, self._shown)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(int(value)) if _DIGITS.fullmatch(value) else None


class WebhookSink:
    """Owns one `httpx.Client` for one endpoint; `close()` it (or use `with`)."""

    def __init__(
        self,
        settings: SinkSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
        host: str | None = None,
    ) -> None:
        """`sleep`, `clock` and `rng` are injectable for tests; `on_attempt` is called
        once per attempt (for metrics); `host` is the HEC envelope's `host`, if any."""
        if not settings.url:
            raise InvalidInput("the alert sink has no endpoint: set SYNTHWATCH_SINK__URL")
        try:
            parsed = httpx.URL(settings.url)
        except (httpx.InvalidURL, TypeError):
            raise InvalidInput("SYNTHWATCH_SINK__URL is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(
                f"SYNTHWATCH_SINK__URL must be an http:// or https:// URL with a host, "
                f"not {shown_endpoint(settings.url)}"
            )
        self.format: Format = settings.format
        self.endpoint = shown_endpoint(settings.url)
        """The endpoint as it may be shown (origin only)."""
        self._url = settings.url
        self._settings = settings
        # An empty secret or token counts as unset: an HMAC with an empty key proves nothing.
        self._secret = (settings.secret.get_secret_value() if settings.secret else "") or None
        token = settings.splunk_token.get_secret_value() if settings.splunk_token else ""
        self._token = token if token and settings.format == "splunk_hec" else None
        self._max_attempts = max(1, settings.max_attempts)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._on_attempt = on_attempt
        self._host = host
        self._scrub_values = self._secret_values(parsed, settings)
        self._log_filter = _HideEndpoint(settings.url, self.endpoint)
        logging.getLogger("httpx").addFilter(self._log_filter)
        # No environment proxies or .netrc credentials (no module reads the environment
        # on its own), no retries inside httpcore (this class decides), no redirects.
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(retries=0, trust_env=False),
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(settings.timeout_s),
            headers={"User-Agent": f"synthwatch/{synthwatch.__version__}"},
        )

    @staticmethod
    def _secret_values(parsed: httpx.URL, settings: SinkSettings) -> list[str]:
        values = [
            settings.secret.get_secret_value() if settings.secret else "",
            settings.splunk_token.get_secret_value() if settings.splunk_token else "",
            settings.url or "",
            str(parsed),
            parsed.userinfo.decode("ascii", "replace"),
            # The Basic credentials httpx derives from the userinfo, as a server may echo them.
            base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
            if parsed.userinfo
            else "",
            parsed.password or "",
            parsed.query.decode("ascii", "replace"),
            parsed.path if parsed.path != "/" else "",
            parsed.raw_path.partition(b"?")[0].decode("ascii", "replace").strip("/"),
        ]
        return sorted({v for v in values if v}, key=len, reverse=True)

    def __enter__(self) -> WebhookSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        logging.getLogger("httpx").removeFilter(self._log_filter)

    def _scrub(self, text: str) -> str:
        for value in self._scrub_values:
            text = text.replace(value, REDACTED)
        text = " ".join(redact_urls(text).split())
        if len(text) > _BODY_SNIPPET_CHARS:
            text = text[:_BODY_SNIPPET_CHARS] + "..."
        return text

    def _headers(self, alert_id: str, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: alert_id,
            ALERT_ID_HEADER: alert_id,
        }
        if self._secret is not None:
            timestamp = str(int(self._clock()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        if self._token is not None:
            headers["Authorization"] = f"Splunk {self._token}"
        return headers

    def _post(self, alert_id: str, body: bytes) -> tuple[int | None, str, bool, float | None]:
        """One POST: (status, detail, retryable, Retry-After seconds)."""
        try:
            with self._client.stream(
                "POST", self._url, content=body, headers=self._headers(alert_id, body)
            ) as response:
                status = response.status_code
                # Read a small body to the end, so the connection can be reused; of a
                # large one, only what an error message could quote.
                snippet = b""
                for chunk in response.iter_bytes():
                    snippet += chunk
                    if len(snippet) >= _BODY_READ_BYTES:
                        break
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            return None, type(exc).__name__, False, None
        except httpx.TransportError as exc:
            # Connection refused or reset, connect/read/write/pool timeouts, a broken
            # response: the endpoint may be back on the next attempt. The exception's
            # text is not shown: the class name says what happened.
            return None, type(exc).__name__, True, None
        if 200 <= status < 300:
            return status, f"HTTP {status}", False, None
        retryable = status in RETRYABLE_STATUS or 500 <= status < 600
        detail = f"HTTP {status}"
        if 300 <= status < 400:
            detail += " (redirects are not followed: set the sink URL to the final address)"
        text = self._scrub(snippet.decode("utf-8", "replace"))
        if text:
            detail += f": {text}"
        return status, detail, retryable, _retry_after_s(response) if retryable else None

    def _record(self, attempt: Attempt, attempts: list[Attempt]) -> None:
        attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)

    def deliver(self, alert: Alert) -> Delivery:
        """POST the alert until it is delivered; raises `DeliveryFailed` when it cannot be."""
        s = self._settings
        body = format_alert(
            alert,
            self.format,
            sourcetype=s.splunk_sourcetype,
            index=s.splunk_index,
            host=self._host,
        )
        log = structlog.get_logger("synthwatch.sink")
        attempts: list[Attempt] = []
        for number in range(1, self._max_attempts + 1):
            status, detail, retryable, retry_after = self._post(alert.alert_id, body)
            if status is not None and 200 <= status < 300:
                self._record(Attempt(number, "delivered", self.format, status, detail), attempts)
                log.debug("sink.delivered", alert_id=alert.alert_id, attempt=number, status=status)
                return Delivery(alert.alert_id, status, tuple(attempts))
            if retryable and number < self._max_attempts:
                if retry_after is not None:
                    delay = min(retry_after, s.backoff_max_s)
                else:
                    delay = backoff(number, s.backoff_s, s.backoff_max_s, self._rng)
                self._record(
                    Attempt(number, "retried", self.format, status, detail, delay), attempts
                )
                log.warning(
                    "sink.retry",
                    alert_id=alert.alert_id,
                    endpoint=self.endpoint,
                    attempt=number,
                    max_attempts=self._max_attempts,
                    detail=detail,
                    delay_s=round(delay, 3),
                )
                self._sleep(delay)
                continue
            self._record(Attempt(number, "dead_lettered", self.format, status, detail), attempts)
            why = "retries exhausted" if retryable else "not retried"
            message = (
                f"alert {alert.alert_id} not delivered to {self.endpoint} after {number} "
                f"attempt(s) ({why}): {detail}"
            )
            log.error(
                "sink.dead_lettered",
                alert_id=alert.alert_id,
                endpoint=self.endpoint,
                attempts=number,
                detail=detail,
            )
            raise DeliveryFailed(
                message, alert_id=alert.alert_id, status=status, attempts=tuple(attempts)
            )
        raise AssertionError("max_attempts >= 1, so the loop returns or raises")
