"""Configure structlog once, at the entry point: JSON when stderr is not a TTY.

Agents bind topic, partition, offset and media sha256 with `structlog.contextvars`, so
every line logged while a record is processed carries them. Standard-library loggers
(faust, aiokafka, botocore) go through the same renderer.

Every line, ours or a library's, passes `redact_secrets` last before it is rendered:
URLs lose their credentials and signature-like query values, and values logged under a
secret-sounding name are replaced. Tracebacks are rendered to text first so that the
same redaction covers them (and no traceback prints local variables).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog

from synthwatch.operators import netguard

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")
# A second pass over what `netguard.redact_url` returns: it keeps `GoogleAccessId` (the
# signer's identity), and a URL it misparses (e.g. an "@" in the query after a port)
# can leave signature pairs outside the query it redacts.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&;?#\s]*"
    r"(?:sig|token|key|secret|pass|auth|credential|session|policy|x-amz-|x-goog-|googleaccessid)"
    r"[^=&;?#\s]*=)[^&;#\s]*",
    re.IGNORECASE,
)
_SECRET_NAME = re.compile(
    r"passw|secret|token|credential|authorization|api_?key|access_key", re.IGNORECASE
)
REDACTED = "REDACTED"


def redact_urls(text: str) -> str:
    """`text` with every URL in it made safe to show (see `netguard.redact_url`)."""
    return _URL.sub(
        lambda m: _SECRET_PARAM.sub(rf"\g<name>{REDACTED}", netguard.redact_url(m.group())), text
    )


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_urls(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return _redact_items(value)
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    # Both renderers would show repr(value); redact that text instead.
    return redact_urls(repr(value))


def _redact_items(items: Mapping[Any, Any]) -> dict[Any, Any]:
    return {k: REDACTED if _holds_secret(k, v) else _redact(v) for k, v in items.items()}


def _holds_secret(key: object, value: object) -> bool:
    """A value logged under a secret-sounding name; counts and flags are left alone."""
    return (
        isinstance(key, str)
        and _SECRET_NAME.search(key) is not None
        and not isinstance(value, (bool, int, float))
    )


def redact_secrets(
    logger: object, name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Processor: no credential or URL signature reaches a log line."""
    return _redact_items(event)


def configure(level: str = "INFO", json: bool | None = None) -> None:
    use_json = (not sys.stderr.isatty()) if json is None else json
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "urllib3", "httpx", "httpcore", "aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    log: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return log
