"""The failure classes an operator can raise, one exception type per DLQ reason.

Every error a user or a hostile input can cause is one of these. The topology routes
them to `media.dlq` with `reason`, the CLI prints them as one line; nothing else in the
code decides how a failure is reported. `permanent` says whether a retry could help.
"""

from __future__ import annotations

from typing import ClassVar


class SynthwatchError(Exception):
    """Base class: a failure with a stable DLQ reason and a message safe to show a user."""

    reason: ClassVar[str] = "error"
    permanent: ClassVar[bool] = True


class InvalidRef(SynthwatchError):
    """The reference itself is unusable: bad scheme, malformed URL, path outside the allow-list."""

    reason = "invalid_ref"


class RefusedAddress(SynthwatchError):
    """The destination resolves to an address the fetcher must not contact (SSRF guard)."""

    reason = "refused_address"


class FetchFailed(SynthwatchError):
    """The remote answered with an error or the transfer broke; 5xx and network errors are
    transient."""

    reason = "fetch_failed"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    @property
    def is_permanent(self) -> bool:
        return not self.transient


class FetchTimeout(SynthwatchError):
    """The transfer exceeded its wall-clock budget."""

    reason = "timeout"
    permanent = False


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
    permanent = False


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the same input could possibly succeed."""
    if isinstance(exc, FetchFailed):
        return exc.is_permanent
    if isinstance(exc, SynthwatchError):
        return exc.permanent
    return False
