"""kit's `LeanTracer` against the SDK's tracer: the spans of the drivers'
instrumentations exported field by field, and the same sampling decisions."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)

from kit.settings import ServiceSettings
from kit.tracing import (
    LeanSpan,
    LeanTracer,
    LeanTracerProvider,
    RequestRootSampler,
    _statement_attributes,
    _StatementNames,
    head_sampling,
)

PROGRAM = Path(__file__).with_name("driver_spans.py")


def exported_by(mode: str, dsn: str, redis_url: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, str(PROGRAM), mode, dsn, redis_url],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    spans: list[dict[str, Any]] = json.loads(result.stdout)
    return spans


def test_the_drivers_spans_are_exported_as_the_sdks_tracer_exports_them(
    postgres_server_url: str, redis_url: str
) -> None:
    dsn = f"{postgres_server_url}/test".replace("postgresql+asyncpg://", "postgresql://")
    sdks = exported_by("sdk", dsn, redis_url)
    mine = exported_by("kit", dsn, redis_url)
    assert len(mine) == len(sdks)
    for kit_span, sdk_span in zip(mine, sdks, strict=True):
        for key in sdk_span:
            assert (key, kit_span[key]) == (key, sdk_span[key])

    clients = [span for span in mine if span.get("kind") == "CLIENT"]
    # only the sampled request's calls: none outside a request, none for a caller that did not sample
    assert {span["parent"][0] for span in clients} == {"GET /things"}
    systems = {span["attributes"]["db.system"] for span in clients}
    assert systems == {"postgresql", "redis"}
    names = [span["name"] for span in clients]
    assert "CURSOR: SELECT" in names
    assert "SET" in names
    assert "GET" in names
    failed = [span for span in clients if span["status"][0] == "ERROR"]
    assert len(failed) == 4  # the missing table and the INCR of a string, twice
    assert all(event[0] == "exception" and event[2] for span in failed for event in span["events"])
    (handler,) = [span for span in mine if span["name"] == "failing"]
    assert handler["status"] == ["ERROR", "RuntimeError: the handler failed"]
    assert handler["attributes"] == {"app.note": "set by the app"}


class Ids(IdGenerator):
    """The same ids, in the same order, for both tracers."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self.random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.random.getrandbits(128) or 1


class StartSeen(SpanProcessor):
    """What a span processor reads of a span as it starts."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.seen.append(
            (
                span.name,
                span.kind,
                span.context,
                span.parent,
                dict(span.attributes or {}),
                span.start_time is not None,
                span.resource,
                span.instrumentation_scope,
            )
        )


def tracer_of(
    sampler_name: str, lean: bool, started: StartSeen | None = None
) -> tuple[trace.Tracer, InMemorySpanExporter]:
    head = head_sampling(
        ServiceSettings(
            otel_traces_sampler=sampler_name, otel_traces_sampler_arg=0.5, _env_file=None
        )
    )
    provider = TracerProvider(
        resource=Resource.create({"service.name": "t"}),
        sampler=RequestRootSampler(head.sampler, head),
        id_generator=Ids(7),
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if started is not None:
        provider.add_span_processor(started)
    given: trace.TracerProvider = LeanTracerProvider(provider) if lean else provider
    return given.get_tracer("drivers", "1.0", schema_url="https://example.com/s"), exporter


def parents(rng: random.Random) -> list[trace.Span | None]:
    made: list[trace.Span | None] = [None]
    for _ in range(40):
        flags = TraceFlags(rng.choice([0, 1, 2, 3]))
        state = TraceState([("vendor", "a1")]) if rng.random() < 0.5 else None
        context = SpanContext(rng.getrandbits(128), rng.getrandbits(64), True, flags, state)
        made.append(NonRecordingSpan(context))
    return made


@pytest.mark.parametrize(
    "sampler_name",
    ["parentbased_always_on", "parentbased_traceidratio", "traceidratio", "always_on"],
)
def test_lean_spans_are_sampled_and_identified_as_the_sdks(sampler_name: str) -> None:
    """Under sampled and unsampled callers and with none, for every kind: the
    same recording decision, ids, flags and trace state as the SDK's tracer."""
    results: dict[bool, list[tuple[Any, ...]]] = {}
    for lean in (False, True):
        started = StartSeen()
        tracer, exporter = tracer_of(sampler_name, lean, started)
        assert isinstance(tracer, LeanTracer) is lean
        seen: list[tuple[Any, ...]] = []
        for parent in parents(random.Random(3)):
            context = None if parent is None else trace.set_span_in_context(parent)
            for kind in (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.INTERNAL):
                span = tracer.start_span("op", context, kind, {"n": 1})
                assert isinstance(span, LeanSpan) is (lean and span.is_recording())
                made = span.get_span_context()
                seen.append((span.is_recording(), made.trace_id, made.span_id, made.trace_flags))
                seen.append((made.trace_state.to_header(), made.is_remote))
                span.end()
        results[lean] = [*seen, (len(exporter.get_finished_spans()),), *started.seen]
    assert results[True] == results[False]


def test_a_span_with_links_or_used_as_a_context_manager_behaves_as_the_sdks() -> None:
    exported: dict[bool, list[tuple[Any, ...]]] = {}
    for lean in (False, True):
        tracer, exporter = tracer_of("parentbased_always_on", lean)
        caller = trace.set_span_in_context(
            NonRecordingSpan(SpanContext(5, 6, True, TraceFlags(TraceFlags.SAMPLED)))
        )
        linked = tracer.start_span(
            "linked", caller, SpanKind.CONSUMER, links=[Link(SpanContext(8, 9, True), {"k": "v"})]
        )
        linked.end()
        with (
            contextlib.suppress(ValueError),
            tracer.start_span("own", caller, SpanKind.CLIENT) as span,
        ):
            span.set_attributes({"bad": [1, "mixed"], "": "no name", "ok": ("a", "b")})
            raise ValueError("escaped")
        with tracer.start_as_current_span("quiet", caller, record_exception=False) as span:
            span.set_status(StatusCode.OK)
            span.set_status(StatusCode.ERROR, "ignored after OK")
        current: list[trace.Span] = []
        with (
            contextlib.suppress(KeyError),
            tracer.start_as_current_span("current", caller, SpanKind.CLIENT) as span,
        ):
            current.append(trace.get_current_span())
            raise KeyError("missing")
        assert current == [span]
        assert trace.get_current_span() is trace.INVALID_SPAN
        exported[lean] = [
            (
                s.name,
                s.kind,
                dict(s.attributes or {}),
                s.status.status_code,
                s.status.description,
                [
                    (e.name, e.attributes and e.attributes.get("exception.escaped"))
                    for e in s.events
                ],
                [(link.context, dict(link.attributes or {})) for link in s.links],
                s.instrumentation_scope,
            )
            for s in exporter.get_finished_spans()
        ]
    assert exported[True] == exported[False]
    assert [span[0] for span in exported[True]] == ["linked", "own", "quiet", "current"]


async def test_a_statements_attributes_are_worked_out_once_and_are_the_instrumentations(
    postgres_server_url: str,
) -> None:
    from opentelemetry.instrumentation import asyncpg as instrumentation

    # the instrumentation's own, also where kit has put its own in front of it
    hydrate = instrumentation._hydrate_span_from_args
    original = getattr(hydrate, "__wrapped__", hydrate)
    worked_out: list[str] = []

    def counting(connection: Any, query: Any, parameters: Any, *args: Any) -> dict[str, Any]:
        worked_out.append(query)
        made: dict[str, Any] = original(connection, query, parameters, *args)
        return made

    remembering = _statement_attributes(counting)
    dsn = f"{postgres_server_url}/test".replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        first = remembering(connection, "SELECT 1", None)
        first["changed"] = "by the caller"
        again = remembering(connection, "SELECT 1", None)
        other = remembering(connection, "SELECT 2", None)
        with_parameters = remembering(connection, "SELECT $1", (1,))
        remembering(connection, "SELECT $1", (1,))
    finally:
        await connection.close()
    assert again == original(connection, "SELECT 1", None)
    assert again["db.system"] == "postgresql"
    assert other == original(connection, "SELECT 2", None)
    assert with_parameters == original(connection, "SELECT $1", (1,))
    assert worked_out == ["SELECT 1", "SELECT 2", "SELECT $1", "SELECT $1"]


@pytest.mark.parametrize(
    "text",
    [
        "SELECT products.id, products.name FROM products WHERE products.id = ANY($1)",
        "/* a comment */ UPDATE t SET x = 1",
        "/* a comment */",
        "",
        "   ",
        "\n\tselect 1",
        "/* one */ /* two */ DELETE FROM t",
    ],
)
def test_a_statements_span_name_is_the_instrumentations(text: str) -> None:
    """The instrumentation's own expression, on its own pattern and on the
    remembered first words: the same name, or the same IndexError."""
    pattern = AsyncPGInstrumentor._leading_comment_remover

    def name(remover: Any) -> str:
        try:
            first: str = remover.sub("", text).split()[0]
        except IndexError:
            return "<IndexError>"
        return first

    names = _StatementNames(pattern)
    assert name(names) == name(names) == name(pattern)
    assert names.sub("x", text) == pattern.sub("x", text)  # any other use: the pattern's
    assert names.pattern is pattern
    assert names.flags == pattern.flags
