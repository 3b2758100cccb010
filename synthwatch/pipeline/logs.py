"""Configure structlog once, at the entry point: JSON when stderr is not a TTY.

Agents bind topic, partition, offset and media sha256 with `structlog.contextvars`, so
every line logged while a record is processed carries them. Standard-library loggers
(faust, aiokafka, botocore) go through the same renderer.

Every line, ours or a library's, passes `redact_secrets` last before it is rendered:
URLs lose their credentials and signature-like query values, and values logged under a
secret-sounding name are replaced (`synthwatch.operators.redact` knows which).
Tracebacks are rendered to text first so that the same redaction covers them (and no
traceback prints local variables).
"""

from __future__ import annotations

import logging
import sys

import structlog

from synthwatch.operators.redact import redact_fields


def redact_secrets(
    logger: object, name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Processor: no credential or URL signature reaches a log line."""
    return redact_fields(event)


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
