"""gateway.spans: the client span of a request sent to a replica."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import spans
from gateway.pool import Replica


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(spans, "tracing_enabled", lambda: True)
    monkeypatch.setattr(spans, "_tracer", provider.get_tracer("gateway.upstream"))
    return exporter


def test_with_tracing_off_nothing_is_made_or_carried() -> None:
    with spans.client_span("GET", Replica("10.0.0.7", 8000), b"/catalog/ping") as span:
        span.answered(200)
    assert span.carried == []
    assert span.span is None


def test_the_span_goes_upstream_in_traceparent_and_records_the_answer(
    exported: InMemorySpanExporter,
) -> None:
    outer = trace.get_current_span()
    with spans.client_span("POST", Replica("10.0.0.7", 8000), b"/auth/token?x=1") as span:
        assert trace.get_current_span() is span.span
        span.answered(401)
    assert trace.get_current_span() is outer
    (finished,) = exported.get_finished_spans()
    assert finished.name == "POST"
    assert finished.kind is SpanKind.CLIENT
    assert dict(finished.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": "http://10.0.0.7:8000/auth/token?x=1",
        "server.address": "10.0.0.7",
        "server.port": 8000,
        "http.response.status_code": 401,
    }
    assert finished.status.status_code is StatusCode.ERROR  # a 4xx fails a client span
    context = finished.get_span_context()
    assert context is not None
    carried = dict(span.carried)
    assert carried["traceparent"] == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    )
    assert context.trace_flags.sampled


def test_an_exchange_that_failed_records_its_exception_once(
    exported: InMemorySpanExporter,
) -> None:
    with (
        pytest.raises(ConnectionResetError),
        spans.client_span("GET", Replica("10.0.0.7", 8000), b"/catalog/ping"),
    ):
        raise ConnectionResetError("reset by peer")
    (finished,) = exported.get_finished_spans()
    assert [event.name for event in finished.events] == ["exception"]
    assert finished.status.status_code is StatusCode.ERROR
    assert "http.response.status_code" not in (finished.attributes or {})
