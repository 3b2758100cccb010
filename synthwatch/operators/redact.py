"""What synthwatch shows of a URL or a logged value: never a credential or a signature.

The one place that knows which query parameters and field names carry secrets. Fetch
errors, verdicts, alerts, evidence manifests, SIEM findings, webhook errors and every log
line (the pipeline's structlog processor and the httpx/httpcore log filter) all pass
through `redact_url` or `redact_urls`.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

REDACTED = "REDACTED"

SENSITIVE_PARAMS = (
    "sig",
    "token",
    "key",
    "secret",
    "pass",
    "auth",
    "credential",
    "session",
    "policy",
    "code",
    "x-amz-",
    "x-goog-",
    "googleaccessid",
)
"""Query parameters whose name contains one of these (case-insensitive, after
percent-decoding) have their value replaced: presigned S3/GCS/Azure/CloudFront URLs, API
tokens and OAuth codes carry their secret in the query. `googleaccessid` is the signer's
identity on a GCS signed URL."""

SENSITIVE_FIELDS = (
    "passw",
    "secret",
    "token",
    "credential",
    "authorization",
    "apikey",
    "api_key",
    "access_key",
)
"""A logged value under a name containing one of these is replaced (counts and flags
are kept: `tokens=3` says nothing secret)."""

_SENSITIVE_PARAM = re.compile("|".join(re.escape(p) for p in SENSITIVE_PARAMS), re.IGNORECASE)
_SENSITIVE_FIELD = re.compile("|".join(re.escape(f) for f in SENSITIVE_FIELDS), re.IGNORECASE)

# "user:pass@" where the password holds an unescaped "/", "?" or "#": a URL parser ends the
# authority there, so the netloc shows no "@" and the secret would be shown as host, port,
# path or query. Matched on the raw text, from just after "scheme:" to the first "@".
_LOOSE_USERINFO = re.compile(r"^(?P<lead>[a-z][a-z0-9+.-]*:[/\\]*)[^/\\?#@]*:[^@]*@", re.I)
_PAIR = re.compile(r"(?<=[?&;@])(?P<name>[^=&;?#/@\s]+)=(?P<value>[^&;#\s]*)")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")
# The same pairs anywhere in a URL's text, for a URL `redact_url` misparses (e.g. an "@"
# in the query after a port leaves signature pairs outside the query it redacts).
_LOOSE_PAIR = re.compile(r"(?P<name>[?&;][^=&;?#\s]*=)(?P<value>[^&;#\s]*)")


def _sensitive(name: str) -> bool:
    return _SENSITIVE_PARAM.search(urllib.parse.unquote_plus(name)) is not None


def redact_url(url: str) -> str:
    """`url` safe to log or show: no credentials, no signature-like query values, no fragment.

    Errs towards hiding: a URL whose text looks like it carries "user:password@", even a
    malformed one, loses everything before that "@".
    """
    url = _LOOSE_USERINFO.sub(r"\g<lead>***@", url, count=1)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    # Servers split on ";" as well as "&" and decode names, so `%73ig=` means `sig=`.
    pieces = re.split(r"([&;])", parts.query)
    for i, item in enumerate(pieces):
        name, sep, _value = item.partition("=")
        if sep and _sensitive(name):
            pieces[i] = f"{name}={REDACTED}"
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "".join(pieces), ""))
    # When the loose "user:password@" match swallowed the real "?" (an "@" in a query
    # value: GCS's GoogleAccessId is an e-mail address), the pairs after it sit in what
    # the parser calls the host or path: redact name=value pairs wherever they are.
    return _PAIR.sub(_redact_pair, shown)


def _redact_pair(m: re.Match[str]) -> str:
    name = m.group("name")
    if m.group("value") == REDACTED or not _sensitive(name):
        return m.group(0)
    return f"{name}={REDACTED}"


def _redact_loose_pair(m: re.Match[str]) -> str:
    if m.group("value") == REDACTED or not _sensitive(m.group("name")):
        return m.group(0)
    return f"{m.group('name')}{REDACTED}"


def redact_urls(text: str) -> str:
    """`text` with every URL in it made safe to show (see `redact_url`); a URL already
    redacted is left as it is."""
    return _URL.sub(lambda m: _LOOSE_PAIR.sub(_redact_loose_pair, redact_url(m.group())), text)


def holds_secret(name: object, value: object) -> bool:
    """A value logged under a secret-sounding name; counts and flags are left alone."""
    return (
        isinstance(name, str)
        and _SENSITIVE_FIELD.search(name) is not None
        and not isinstance(value, (bool, int, float))
    )


def redact_fields(items: Mapping[Any, Any]) -> dict[Any, Any]:
    """A log event or a record's fields with secrets replaced and every URL redacted."""
    return {k: REDACTED if holds_secret(k, v) else redact_value(v) for k, v in items.items()}


def redact_value(value: Any) -> Any:
    """One logged value made safe to show; anything not plain data is shown by its repr."""
    if isinstance(value, str):
        return redact_urls(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return redact_fields(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    # Both renderers would show repr(value); redact that text instead.
    return redact_urls(repr(value))
