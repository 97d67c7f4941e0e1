"""kit's OTLP encoder against the SDK's: the same message, field for field."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from kit.otlp import SpanEncoder
from kit.tracing import LeanSpan

REMOTE = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "a1"), ("other", "b2")]),
)


def spans_of(resource: Resource) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=resource)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def made_spans() -> list[ReadableSpan]:
    """Spans with every field the encoder writes: kinds, parents local and
    remote, trace state, each attribute type, events, links, statuses, several
    resources and scopes."""
    provider, exporter = spans_of(Resource.create({"service.name": "catalog", "n": 3}))
    other, other_exporter = spans_of(Resource.create({"service.name": "chat"}))
    server_tracer = provider.get_tracer("kit.tracing")
    # another tracer of the same scope: its spans go with the first one's
    failing_tracer = provider.get_tracer("kit.tracing")
    driver_tracer = provider.get_tracer(
        "opentelemetry.instrumentation.asyncpg",
        "0.66b1",
        schema_url="https://opentelemetry.io/schemas/1.11.0",
        attributes={"scope.kind": "driver"},
    )
    remote = set_span_in_context(NonRecordingSpan(REMOTE))
    with server_tracer.start_as_current_span(
        "GET /catalog/products/{product_id}", context=remote, kind=SpanKind.SERVER
    ) as server:
        server.set_attributes(
            {
                "http.request.method": "GET",
                "url.path": "/catalog/products/7",
                "http.response.status_code": 200,
                "negative": -5,
                "big": (1 << 63) - 1,
                "ratio": 0.25,
                "flag": False,
                "empty": "",
                "zero": 0,
                "tags": ("a", "bé", ""),
                "numbers": [1, -2, 300],
                "floats": [1.5, -0.0],
                "bools": [True, False],
                "unicode": "żółw ✓",
                "long": "x" * 300,
            }
        )
        with driver_tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT) as child:
            child.set_attribute("db.system", "postgresql")
            child.add_event("retry", {"attempt": 2})
        with driver_tracer.start_as_current_span(
            "fan out",
            kind=SpanKind.PRODUCER,
            links=[Link(REMOTE, {"link.reason": "batch"}), Link(server.get_span_context())],
        ) as producer:
            producer.set_status(Status(StatusCode.ERROR, "upstream gave up"))
        try:
            with failing_tracer.start_as_current_span("failing", kind=SpanKind.INTERNAL):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        server.set_status(Status(StatusCode.OK))
    with other.get_tracer("chat").start_as_current_span("deliver", kind=SpanKind.CONSUMER):
        pass
    finished = list(exporter.get_finished_spans()) + list(other_exporter.get_finished_spans())
    # interleaved, so grouping by resource and scope has work to do
    return [finished[i] for i in (0, 4, 1, 2, 3)]


def normalized(message: ExportTraceServiceRequest) -> bytes:
    encoded: bytes = message.SerializeToString(deterministic=True)
    return encoded


def test_the_lean_encoding_is_the_sdk_encoders_message() -> None:
    spans = made_spans()
    expected = encode_spans(spans)
    encoder = SpanEncoder()
    for _ in range(2):  # the second time from the kept resource and scope encodings
        decoded = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        assert decoded == expected
        assert normalized(decoded) == normalized(expected)
    assert [len(r.scope_spans) for r in decoded.resource_spans] == [2, 1]
    (server,) = [
        span
        for scope in decoded.resource_spans[0].scope_spans
        for span in scope.spans
        if span.kind == span.SPAN_KIND_SERVER
    ]
    assert server.parent_span_id == REMOTE.span_id.to_bytes(8, "big")
    assert server.trace_state == "vendor=a1,other=b2"
    assert server.flags == 0x300


def test_an_empty_batch_is_an_empty_request() -> None:
    assert SpanEncoder().encode([]) == b""
    assert ExportTraceServiceRequest.FromString(b"") == encode_spans([])


def test_an_int_beyond_64_bits_is_left_out_as_the_sdk_leaves_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, exporter = spans_of(Resource.create({"service.name": "catalog"}))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attributes({"huge": 1 << 70, "kept": 1})
    spans = exporter.get_finished_spans()
    with caplog.at_level(logging.ERROR):
        decoded = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert decoded == encode_spans(spans)
    (span_message,) = decoded.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in span_message.attributes] == ["kept"]
    assert "huge" in caplog.text


def spans_with(values: list[dict[str, object]]) -> list[ReadableSpan]:
    provider, exporter = spans_of(Resource.create({"service.name": "catalog"}))
    tracer = provider.get_tracer("t")
    for attributes in values:
        with tracer.start_as_current_span("s") as span:
            span.set_attributes(attributes)  # type: ignore[arg-type]
    return list(exporter.get_finished_spans())


def test_equal_values_of_other_types_are_encoded_each_by_its_own_type() -> None:
    """True == 1 == 1.0 and 0.0 == -0.0, but each is written as its own
    type: the attributes encoded once must not stand in for one another."""
    spans = spans_with(
        [
            {"v": 1, "w": 0.0},
            {"v": True, "w": -0.0},
            {"v": 1.0, "w": 0},
            {"v": "1", "w": False},
            {"v": 1, "w": 0.0},
        ]
    )
    encoder = SpanEncoder()
    for _ in range(2):
        assert ExportTraceServiceRequest.FromString(encoder.encode(spans)) == encode_spans(spans)


def test_attributes_beyond_those_kept_encoded_are_encoded_all_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Values that never repeat (paths, ids): what is kept of them is
    dropped when full, and every span is still the SDK encoder's."""
    monkeypatch.setattr("kit.otlp._MAX_PAIRS", 8)
    monkeypatch.setattr("kit.otlp._pairs", {})
    spans = spans_with(
        [{"url.path": f"/catalog/products/{n}", "n": n % 3, "ok": True} for n in range(40)]
    )
    encoder = SpanEncoder()
    for _ in range(2):
        assert ExportTraceServiceRequest.FromString(encoder.encode(spans)) == encode_spans(spans)
    from kit import otlp

    assert len(otlp._pairs) <= 8


def test_a_string_that_cannot_be_encoded_is_left_out_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spans = spans_with([{"bad": "\ud800", "good": "x"}] * 2)
    with caplog.at_level(logging.ERROR, logger="kit.otlp"):
        decoded = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    ours = [record for record in caplog.records if record.name == "kit.otlp"]
    assert decoded == encode_spans(spans)
    for span_message in decoded.resource_spans[0].scope_spans[0].spans:
        assert [kv.key for kv in span_message.attributes] == ["good"]
    assert ["bad" in record.getMessage() for record in ours] == [True, True]


def test_kits_own_spans_are_encoded_as_the_sdk_encodes_them() -> None:
    """The spans kit's tracer ends with plain attributes (`LeanSpan`), with
    and without a parent, events or links, among the SDK's own."""
    from kit.settings import ServiceSettings
    from kit.tracing import RequestRootSampler, _lean_spans, head_sampling

    head = head_sampling(ServiceSettings(otel_traces_sampler="parentbased_always_on"))
    provider = TracerProvider(
        resource=Resource.create({"service.name": "catalog"}),
        sampler=RequestRootSampler(head.sampler, head),
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = _lean_spans(provider.get_tracer("kit.tracing"))
    assert spans is not None
    plain = spans.start("GET /a", None, attributes={"n": 1, "s": "x", "f": 0.5, "b": True})
    plain.end()
    child_context = set_span_in_context(plain)
    bare = spans.start("SELECT", child_context, SpanKind.CLIENT)
    bare.end()
    eventful = spans.start("GET /b", set_span_in_context(NonRecordingSpan(REMOTE)))
    eventful.add_event("retry", {"attempt": 2})
    eventful.add_link(REMOTE, {"why": "batch"})
    eventful.set_attribute("late", "written by the app")
    eventful.set_status(Status(StatusCode.ERROR, "no"))
    eventful.end()
    finished = list(exporter.get_finished_spans())
    assert [type(span) for span in finished] == [LeanSpan] * 3  # a ReadableSpan once ended
    assert finished[0]._attributes.__class__ is dict
    assert ExportTraceServiceRequest.FromString(SpanEncoder().encode(finished)) == encode_spans(
        finished
    )
