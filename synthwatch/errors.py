"""Every failure synthwatch reports, one exception type per DLQ reason.

The bottom layer of the package: it imports nothing of synthwatch, so records, models,
operators and the pipeline all raise from here (bytewax, arroyo and quix-streams keep
their errors at the package root the same way). Every error a user, a hostile input or
an outage can cause is one of these. The topology routes them to `media.dlq` with
`reason`, the CLI prints them as one line; nothing else in the code decides how a
failure is reported.

One way to say whether a retry could help: `permanent`. A class sets its default; an
instance whose cause decides it (an HTTP 503 against a 404) passes `permanent=` when it
is raised. `is_permanent(exc)` reads it for any exception.
"""

from __future__ import annotations

from typing import ClassVar


class SynthwatchError(Exception):
    """Base class: a failure with a stable DLQ reason and a message safe to show a user."""

    reason: ClassVar[str] = "error"
    default_permanent: ClassVar[bool] = True

    def __init__(self, message: str = "", *, permanent: bool | None = None) -> None:
        super().__init__(message)
        self.permanent: bool = self.default_permanent if permanent is None else permanent
        """Whether retrying the same input could possibly succeed."""


class InvalidRef(SynthwatchError):
    """The reference itself is unusable: bad scheme, malformed URL, path outside the allow-list."""

    reason = "invalid_ref"


class RefusedAddress(SynthwatchError):
    """The destination resolves to an address the fetcher must not contact (SSRF guard)."""

    reason = "refused_address"


class FetchFailed(SynthwatchError):
    """The remote answered with an error or the transfer broke; 5xx and network errors
    are raised with `permanent=False`."""

    reason = "fetch_failed"


class FetchTimeout(SynthwatchError):
    """The transfer exceeded its wall-clock budget."""

    reason = "timeout"
    default_permanent = False


class TooLarge(SynthwatchError):
    """More decoded bytes than the cap allows."""

    reason = "too_large"


class UnsupportedMedia(SynthwatchError):
    """The bytes are not a media type or container format we accept."""

    reason = "unsupported_media"


class CorruptMedia(SynthwatchError):
    """The container or stream could not be decoded."""

    reason = "corrupt_media"


class LimitExceeded(SynthwatchError):
    """Decoding hit a cap on pixels, frames, streams, duration or time."""

    reason = "limit_exceeded"


class ModelUnavailable(SynthwatchError):
    """Weights are missing or do not match the registry's sha256."""

    reason = "model_unavailable"


class InvalidInput(SynthwatchError):
    """A file the user handed over (labels CSV, calibration file) is unusable."""

    reason = "invalid_input"


class ConfigError(SynthwatchError):
    """A setting or a command-line option has a value synthwatch cannot run with."""

    reason = "config"


class SchemaInvalid(SynthwatchError):
    """A record on a topic does not decode as the schema it should have."""

    reason = "schema"


class StorageFailed(SynthwatchError):
    """The object store refused or failed a read or write; usually transient."""

    reason = "storage"
    default_permanent = False


class BrokerUnavailable(SynthwatchError):
    """The Kafka broker could not be reached or refused the request."""

    reason = "broker"
    default_permanent = False


class DeliveryFailed(SynthwatchError):
    """An alert could not be delivered to the sink's endpoint: a permanent refusal (4xx,
    a redirect) or every attempt failed. Permanent: the sink retried already, so the
    alert is dead-lettered (reason `delivery`, stage `sink`)."""

    reason = "delivery"

    def __init__(
        self,
        message: str,
        *,
        alert_id: str,
        status: int | None,
        attempts: tuple[object, ...],
    ) -> None:
        super().__init__(message)
        self.alert_id = alert_id
        self.status = status
        """The last response's HTTP status; None when the last attempt got no response."""
        self.attempts = attempts
        """The sink's `webhook.Attempt` records, first to last."""


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the same input could possibly succeed; False for anything that is
    not a `SynthwatchError` (an unexpected exception is not known to be permanent)."""
    return isinstance(exc, SynthwatchError) and exc.permanent
