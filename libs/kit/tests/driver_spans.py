"""Runs SQL statements and Redis commands under the standard instrumentations,
with the SDK's tracer (`sdk`) or as kit installs them (`kit`: `LeanTracer`,
the statements' attributes worked out once), and prints the
spans they export as JSON: `test_driver_spans.py` compares the two. In a
process of its own, since an instrumentation patches the drivers once per process.

    python driver_spans.py sdk|kit POSTGRES_DSN REDIS_URL
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from kit.settings import ServiceSettings
from kit.tracing import (
    LeanTracerProvider,
    RequestRootSampler,
    _instrument_drivers,
    head_sampling,
)

CALLER = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "a1")]),
)
UNSAMPLED_CALLER = SpanContext(
    CALLER.trace_id, CALLER.span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT)
)


def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """The provider `configure_tracing` makes, keeping every trace, in memory."""
    head = head_sampling(
        ServiceSettings(otel_traces_sampler="parentbased_always_on", _env_file=None)
    )
    made = TracerProvider(
        resource=Resource.create({"service.name": "drivers", "service.instance.id": "drivers-1"}),
        sampler=RequestRootSampler(head.sampler, head),
    )
    exporter = InMemorySpanExporter()
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made, exporter


async def calls(dsn: str, redis_url: str) -> None:
    """Statements and commands that succeed and fail, by every instrumented path."""
    connection = await asyncpg.connect(dsn)
    redis = Redis.from_url(redis_url)
    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        await connection.fetchval("SELECT $1::int + 1", 41)
        await connection.execute("/* a comment */ SELECT 1")
        with contextlib.suppress(asyncpg.UndefinedTableError):
            await connection.fetch("SELECT * FROM no_such_table")
        async with connection.transaction():
            cursor = await connection.cursor("SELECT generate_series(1, 5)")
            await cursor.fetch(2)
            async for _ in connection.cursor("SELECT generate_series(1, 2)"):
                pass
        statement = await connection.prepare("SELECT $1::text")
        await statement.fetchval("prepared")
        async with engine.connect() as session:  # prepared statements, as SQLAlchemy runs them
            await session.execute(text("SELECT CAST(:n AS int)"), {"n": 3})
        await redis.set("lean:key", "value")
        await redis.get("lean:key")
        with contextlib.suppress(ResponseError):  # not an integer
            await redis.incr("lean:key")
        async with redis.pipeline() as pipeline:
            pipeline.set("lean:other", "1")
            pipeline.incr("lean:other")
            await pipeline.execute()
    finally:
        await connection.close()
        await redis.aclose()
        await engine.dispose()


async def run(mode: str, dsn: str, redis_url: str) -> list[ReadableSpan]:
    made, exporter = provider()
    if mode == "kit":  # the drivers as `configure_tracing` instruments them
        _instrument_drivers(made)
        server = LeanTracerProvider(made).get_tracer("kit.tracing")
    else:
        RedisInstrumentor().instrument(tracer_provider=made)
        AsyncPGInstrumentor().instrument(tracer_provider=made)  # type: ignore[no-untyped-call]
        server = made.get_tracer("kit.tracing")
    await calls(dsn, redis_url)  # outside any request: no trace starts
    unsampled = trace.set_span_in_context(NonRecordingSpan(UNSAMPLED_CALLER))
    with server.start_as_current_span("GET /unsampled", unsampled, SpanKind.SERVER):
        await calls(dsn, redis_url)  # a caller that did not sample: nothing recorded
    caller = trace.set_span_in_context(NonRecordingSpan(CALLER))
    with server.start_as_current_span("GET /things", caller, SpanKind.SERVER):
        await calls(dsn, redis_url)
        await calls(dsn, redis_url)  # the same statements again
    token = otel_context.attach(caller)
    try:
        with (
            contextlib.suppress(RuntimeError),
            server.start_as_current_span("failing", kind=SpanKind.SERVER) as span,
        ):
            span.set_attribute("app.note", "set by the app")
            await asyncio.sleep(0)
            raise RuntimeError("the handler failed")
    finally:
        otel_context.detach(token)
    return list(exporter.get_finished_spans())


def comparable(span: ReadableSpan, server_ids: dict[int, str]) -> dict[str, Any]:
    """What an exported span says, but its own ids and times."""
    assert span.context is not None
    parent = span.parent
    events = []
    for event in span.events:
        attributes = dict(event.attributes or {})
        stacktrace = attributes.pop("exception.stacktrace", None)  # its frames differ
        events.append([event.name, attributes, bool(stacktrace), event.timestamp > 0])
    scope = span.instrumentation_scope
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "parent": None
        if parent is None
        else [
            server_ids.get(parent.span_id, f"{parent.span_id:016x}"),
            parent.is_remote,
            parent.trace_flags,
        ],
        "trace_state": span.context.trace_state.to_header(),
        "flags": span.context.trace_flags,
        "remote": span.context.is_remote,
        "attributes": dict(span.attributes or {}),
        "status": [span.status.status_code.name, span.status.description],
        "events": events,
        "links": [list(link.attributes or {}) for link in span.links],
        "scope": None
        if scope is None
        else [scope.name, scope.version, scope.schema_url, dict(scope.attributes or {})],
        "resource": dict(span.resource.attributes),
        "timed": span.start_time is not None
        and span.end_time is not None
        and 0 < span.start_time <= span.end_time,
    }


def main() -> None:
    mode, dsn, redis_url = sys.argv[1:4]
    spans = asyncio.run(run(mode, dsn, redis_url))
    servers = {
        span.context.span_id: span.name
        for span in spans
        if span.kind is SpanKind.SERVER and span.context is not None
    }
    json.dump([comparable(span, servers) for span in spans], sys.stdout)


if __name__ == "__main__":
    main()
