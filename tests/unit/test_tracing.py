"""Trace context from record to record, and spans reaching a collector over OTLP/HTTP."""

from __future__ import annotations

import http.server
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from synthwatch.pipeline import tracing
from synthwatch.pipeline.settings import Settings

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_stage_span_continues_the_trace_on_the_consumed_record() -> None:
    with tracing.span("synthwatch.detect", parent=[("traceparent", PARENT.encode())]):
        out = dict(tracing.current_headers())
    version, trace_id, span_id, flags = out["traceparent"].decode().split("-")
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span_id != "00f067aa0ba902b7", "the stage's own span is the new parent"
    assert (version, flags) == ("00", "01")


def test_a_record_without_context_starts_a_new_trace_each_time() -> None:
    ids = set()
    for _ in range(3):
        with tracing.span("synthwatch.fetch", parent=[("other", b"x")]):
            ids.add(tracing.trace_id())
    assert len(ids) == 3 and all(len(t) == 32 for t in ids)


def test_malformed_trace_headers_are_ignored_not_fatal() -> None:
    bad = [("traceparent", b"\xff\xfe"), ("tracestate", b"not=ok,,="), ("traceparent", b"zz")]
    with tracing.span("synthwatch.decide", parent=bad):
        assert len(tracing.trace_id()) == 32  # a fresh trace, not a crash


def test_passing_a_record_on_keeps_only_its_trace_headers() -> None:
    headers = [("synthwatch-attempt", b"2"), ("traceparent", PARENT.encode())]
    assert tracing.trace_headers(headers) == [("traceparent", PARENT.encode())]
    assert tracing.trace_headers({"traceparent": PARENT.encode()}) == [
        ("traceparent", PARENT.encode())
    ]
    assert tracing.trace_headers(None) == []
    assert tracing.current_headers() == []  # outside any span


def test_static_group_membership_reaches_the_kafka_consumer(tmp_path: Path) -> None:
    from synthwatch.pipeline.topology import Pipeline

    settings = Settings(
        work_dir=tmp_path,
        model_dir=tmp_path / "models",
        kafka={"group_instance_id": "synthwatch-detect-7d9f-abcde"},  # type: ignore[arg-type]
    )
    pipeline = Pipeline(settings, "decide")
    try:
        assert pipeline.app.conf.consumer_group_instance_id == "synthwatch-detect-7d9f-abcde"
        # faust's data directory is under our work dir, not the process's cwd, so a
        # read-only root filesystem is fine and nothing is left in a checkout.
        assert Path(pipeline.app.conf.datadir).is_relative_to(tmp_path)
    finally:
        pipeline.close()


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.bodies.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()


def test_spans_reach_an_otlp_collector_when_one_is_configured(collector: str) -> None:
    # A fresh interpreter: the tracer provider is process-global and set once.
    script = textwrap.dedent(
        f"""
        from opentelemetry import trace
        from synthwatch.pipeline import tracing
        tracing.setup({collector!r})
        with tracing.span("synthwatch.detect", parent=[("traceparent", {PARENT!r}.encode())]):
            headers = dict(tracing.current_headers())
        assert headers["traceparent"].split(b"-")[1] == {PARENT.split("-")[1]!r}.encode()
        trace.get_tracer_provider().shutdown()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    assert _Collector.bodies, "the collector received nothing"
    path, body = _Collector.bodies[0]
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["synthwatch.detect"]
    assert spans[0].trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    attrs = {
        a.key: a.value.string_value for rs in request.resource_spans for a in rs.resource.attributes
    }
    assert attrs["service.name"] == "synthwatch"


def test_log_lines_carry_the_trace_id_inside_the_span_only() -> None:
    import structlog

    structlog.contextvars.clear_contextvars()
    with tracing.span("synthwatch.fetch"):
        inside = structlog.contextvars.get_contextvars().get("trace_id")
        assert inside == tracing.trace_id()
    assert "trace_id" not in structlog.contextvars.get_contextvars()
