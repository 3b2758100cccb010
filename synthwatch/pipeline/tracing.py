"""W3C trace context carried in Kafka headers, from `submit` to the alert.

Every record the pipeline produces carries a `traceparent` header (and `tracestate`
when there is one): `submit` starts a trace per reference (or continues the one a
producer already put on its record), and each stage opens a span as a child of the
context on the record it consumed and puts its own span's context on the record it
produces, so the reference, its fetched record, its verdict, its alert and any retry
or dead letter on the way share one trace id. Log lines written while a record is
processed carry `trace_id`, so a SIEM can join logs and alerts on it.

Spans are recorded by the OpenTelemetry SDK; they leave the process only when the
deployment configures an exporter (settings `tracing.otlp_endpoint`). Without one, the
ids still propagate and still appear in logs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from synthwatch import __version__

HEADERS = ("traceparent", "tracestate")
"""The W3C Trace Context headers (https://www.w3.org/TR/trace-context/)."""

_propagator = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()

Headers = list[tuple[str, bytes]]


def setup(otlp_endpoint: str | None = None) -> None:
    """Install the SDK's tracer provider unless the process already has one (an
    application embedding synthwatch keeps its own), with an OTLP/HTTP exporter when
    `otlp_endpoint` is given. Idempotent."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    with _setup_lock:
        if isinstance(trace.get_tracer_provider(), TracerProvider):
            return
        provider = TracerProvider(
            resource=Resource.create({"service.name": "synthwatch", "service.version": __version__})
        )
        if otlp_endpoint:
            provider.add_span_processor(_otlp_processor(otlp_endpoint))
        trace.set_tracer_provider(provider)


def _otlp_processor(endpoint: str) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:  # the exporter is an optional extra
        raise RuntimeError(
            "tracing.otlp_endpoint is set but the OTLP exporter is not installed: "
            "pip install 'synthwatch[otlp]'"
        ) from None
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))


def _tracer() -> trace.Tracer:
    setup()
    return trace.get_tracer("synthwatch", __version__)


def _carrier(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, str]:
    """The trace headers of a consumed record, as text (others and bad bytes ignored)."""
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        if name in HEADERS and isinstance(value, bytes | bytearray | memoryview):
            try:
                out[name] = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                continue
    return out


def current_headers() -> Headers:
    """The current span's context as Kafka headers (empty outside a span)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return [(k, v.encode("ascii")) for k, v in carrier.items()]


def trace_headers(headers: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> Headers:
    """The trace headers of a consumed record, to pass along unchanged (retry, DLQ)."""
    return [(k, v.encode("ascii")) for k, v in _carrier(headers).items()]


def trace_id(span: Span | None = None) -> str:
    """The 32-hex trace id of `span` (default: the current span); "" when none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


@contextmanager
def span(
    name: str,
    *,
    parent: Iterable[tuple[str, Any]] | Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.CONSUMER,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Span]:
    """A span that is the child of the trace context in `parent` (a consumed record's
    headers), or a new trace's root when it carries none; current inside the block,
    with `trace_id` bound for the log lines written meanwhile."""
    ctx = _propagator.extract(_carrier(parent)) if parent is not None else None
    token = otel_context.attach(ctx) if ctx is not None else None
    try:
        with _tracer().start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {})
        ) as current:
            tid = trace_id(current)
            # Bound for the block only: a caller's later lines do not inherit this trace.
            with structlog.contextvars.bound_contextvars(**({"trace_id": tid} if tid else {})):
                yield current
    finally:
        if token is not None:
            otel_context.detach(token)
