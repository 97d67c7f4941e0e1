from __future__ import annotations

import contextlib
import json
import logging
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from redis.asyncio import Redis
from sqlalchemy import text
from starlette.types import Receive, Scope, Send

from kit.app import assemble
from kit.db import make_engine
from kit.deps import CurrentPrincipal
from kit.logs import JsonFormatter, RequestIdFilter
from kit.observe import ROUTE_TEMPLATE_KEY
from kit.security import TokenVerifier
from kit.settings import DEFAULT_JWT_ISSUER, ServiceSettings
from kit.tracing import (
    LeanSpan,
    RequestRootSampler,
    TracingMiddleware,
    configure_tracing,
    flush_traces,
    head_sampling,
    sampler_for,
    tracing_config,
)
from kit_testing import TokenMinter, started
from kit_testing.otlp_receiver import OtlpReceiver, ReceivedSpan

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
OTHER_TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"


def test_tracing_is_off_without_an_endpoint() -> None:
    """Nothing installed at all: no provider, no middleware, no instrumented driver."""
    program = """
from fastapi import FastAPI
from opentelemetry import trace
from kit.app import assemble
from kit.settings import ServiceSettings
from kit.tracing import TracingMiddleware, tracing_enabled
import asyncpg, redis.asyncio
app = FastAPI()
assemble(app, ServiceSettings(_env_file=None), readiness={})
print(tracing_enabled(), type(trace.get_tracer_provider()).__name__,
      any(m.cls is TracingMiddleware for m in app.user_middleware),
      hasattr(asyncpg.connection.Connection.fetch, "__wrapped__"),
      hasattr(redis.asyncio.Redis.execute_command, "__wrapped__"))
"""
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.split() == ["False", "ProxyTracerProvider", "False", "False", "False"]


def test_the_generic_endpoint_gets_the_traces_path_and_the_specific_one_is_kept() -> None:
    generic = ServiceSettings(otel_exporter_otlp_endpoint="http://jaeger:4318/")
    specific = ServiceSettings(
        otel_exporter_otlp_endpoint="http://jaeger:4318",
        otel_exporter_otlp_traces_endpoint="http://collector:4318/custom",
    )
    assert tracing_config(generic).endpoint == "http://jaeger:4318/v1/traces"
    assert tracing_config(specific).endpoint == "http://collector:4318/custom"
    assert tracing_config(generic).enabled


def test_disabled_sdk_or_no_exporter_turns_tracing_off() -> None:
    endpoint = "http://jaeger:4318"
    assert not tracing_config(ServiceSettings()).enabled
    for settings in (
        ServiceSettings(otel_exporter_otlp_endpoint=endpoint, otel_sdk_disabled=True),
        ServiceSettings(otel_exporter_otlp_endpoint=endpoint, otel_traces_exporter="none"),
    ):
        assert not tracing_config(settings).enabled


def test_by_default_one_trace_in_ten_starts_and_callers_decide_for_theirs() -> None:
    sampler = sampler_for(ServiceSettings(_env_file=None))
    assert sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.1},")
    caller = trace.set_span_in_context(
        NonRecordingSpan(SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1)))
    )
    # a trace id under the ratio's bound is kept, one above it dropped, a caller's flag followed
    low, high = 1, (1 << 64) - 1
    assert sampler.should_sample(None, low, "GET").decision == Decision.RECORD_AND_SAMPLE
    assert sampler.should_sample(None, high, "GET").decision == Decision.DROP
    assert sampler.should_sample(caller, high, "GET").decision == Decision.RECORD_AND_SAMPLE


def test_samplers_and_headers_come_from_the_standard_variables() -> None:
    ratio = ServiceSettings(
        otel_traces_sampler="parentbased_traceidratio", otel_traces_sampler_arg=0.25
    )
    assert sampler_for(ratio).get_description() == (
        "ParentBased{root:TraceIdRatioBased{0.25},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}"
    )
    assert sampler_for(ServiceSettings(otel_traces_sampler="always_off")).get_description() == (
        "AlwaysOffSampler"
    )
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        sampler_for(ServiceSettings(otel_traces_sampler="sometimes"))
    headed = ServiceSettings(
        otel_exporter_otlp_endpoint="http://collector:4318",
        otel_exporter_otlp_headers="authorization=Bearer%20abc,x-tenant=shop",
    )
    assert tracing_config(headed).headers == {"authorization": "Bearer abc", "x-tenant": "shop"}


def test_a_protocol_this_build_cannot_speak_stops_start_up() -> None:
    settings = ServiceSettings(
        otel_exporter_otlp_endpoint="http://jaeger:4317", otel_exporter_otlp_protocol="grpc"
    )
    with pytest.raises(ValueError, match="http/protobuf"):
        tracing_config(settings)


@pytest.fixture(scope="module")
def minter() -> TokenMinter:
    return TokenMinter()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


class Lines(logging.Handler):
    """The access log as the service writes it (kit's filter and JSON formatter)."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
async def traced(
    receiver: OtlpReceiver, redis_url: str, postgres_server_url: str, minter: TokenMinter
) -> AsyncIterator[tuple[httpx.AsyncClient, Lines]]:
    settings = ServiceSettings(
        service_name="tracing-test",
        otel_exporter_otlp_endpoint=receiver.endpoint_for("127.0.0.1"),
        # every trace a request starts, not the default one in ten
        otel_traces_sampler="parentbased_always_on",
        _env_file=None,
    )
    assert configure_tracing(settings)
    engine = make_engine(f"{postgres_server_url}/test")
    redis = Redis.from_url(redis_url)

    verifier = TokenVerifier(
        keys=minter.key_source,
        issuer=DEFAULT_JWT_ISSUER,
        audience="bazaar",
        algorithms=["ES256"],
        redis=None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"settings": settings, "redis": redis, "engine": engine, "verifier": verifier}

    app = FastAPI(lifespan=lifespan)
    assemble(app, settings, readiness={})

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str, request: Request, principal: CurrentPrincipal) -> dict[str, Any]:
        await request.state.redis.get(f"thing:{thing_id}")
        async with request.state.engine.connect() as connection:
            value = (await connection.execute(text("SELECT 1"))).scalar_one()
        return {"id": thing_id, "value": value}

    lines = Lines()
    access = logging.getLogger("access")
    access.addHandler(lines)
    try:
        async with started(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client, lines
    finally:
        access.removeHandler(lines)
        await redis.aclose()
        await engine.dispose()


def trace_of(trace_id: str) -> Any:
    def found(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        mine = [span for span in spans if span.trace_id == trace_id]
        # the server span ends last: once it is here, its children are too
        return mine if any(span.kind == "SERVER" for span in mine) else []

    return found


async def test_a_request_continues_the_callers_trace_with_sql_and_redis_spans(
    traced: tuple[httpx.AsyncClient, Lines], receiver: OtlpReceiver, minter: TokenMinter
) -> None:
    client, lines = traced
    token = minter.token(user_id="user-7")
    response = await client.get(
        "/things/42",
        headers={
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "authorization": f"Bearer {token}",
        },
    )
    assert response.status_code == 200
    flush_traces()
    spans = receiver.wait_for(trace_of(CALLER_TRACE), within=10)

    (server,) = [span for span in spans if span.kind == "SERVER"]
    assert server.name == "GET /things/{thing_id}"
    assert server.parent_span_id == CALLER_SPAN
    assert server.service == "tracing-test"
    assert server.attributes["http.route"] == "/things/{thing_id}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/things/42"
    children = {span.name: span for span in spans if span.parent_span_id == server.span_id}
    assert children["GET"].kind == "CLIENT"  # redis
    assert children["GET"].attributes["db.system"] == "redis"
    assert children["SELECT"].kind == "CLIENT"  # asyncpg, under SQLAlchemy
    assert children["SELECT"].attributes["db.system"] == "postgresql"

    (line,) = [line for line in lines.lines if line["path"] == "/things/42"]
    assert line["trace_id"] == CALLER_TRACE
    assert line["route"] == "/things/{thing_id}"
    assert line["user_id"] == "user-7"
    assert line["status"] == 200
    assert line["request_id"] == response.headers["x-request-id"]


async def test_a_request_without_traceparent_starts_a_trace_and_probes_start_none(
    traced: tuple[httpx.AsyncClient, Lines], receiver: OtlpReceiver, minter: TokenMinter
) -> None:
    client, lines = traced
    before = {span.trace_id for span in receiver.spans()}
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    response = await client.get("/things/7", headers={"authorization": f"Bearer {minter.token()}"})
    assert response.status_code == 200
    (line,) = [line for line in lines.lines if line["path"] == "/things/7"]
    trace_id = line["trace_id"]
    assert trace_id
    assert trace_id not in before
    flush_traces()
    spans = receiver.wait_for(trace_of(trace_id), within=10)
    (server,) = [span for span in spans if span.kind == "SERVER"]
    assert server.parent_span_id is None
    new_traces = {span.trace_id for span in receiver.spans()} - before
    # the probes and the scrape started no trace, nor did any call outside a request
    assert new_traces == {trace_id}


async def test_a_call_outside_any_request_is_not_traced(
    traced: tuple[httpx.AsyncClient, Lines], receiver: OtlpReceiver, redis_url: str
) -> None:
    before = len(receiver.spans())
    redis = Redis.from_url(redis_url)
    try:
        await redis.ping()
    finally:
        await redis.aclose()
    flush_traces()
    assert len(receiver.spans()) == before


async def test_the_middleware_spans_a_plain_asgi_app_by_its_route_template(
    traced: tuple[httpx.AsyncClient, Lines], receiver: OtlpReceiver
) -> None:
    """What the gateway's proxy has: no FastAPI, a route template set by the app."""

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        scope[ROUTE_TEMPLATE_KEY] = "/catalog"
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream down"})

    transport = httpx.ASGITransport(app=TracingMiddleware(proxy))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(
            "/catalog/products/9", headers={"traceparent": f"00-{OTHER_TRACE}-{CALLER_SPAN}-01"}
        )
    assert response.status_code == 502
    flush_traces()
    (span,) = receiver.wait_for(trace_of(OTHER_TRACE), within=10)
    assert span.name == "GET /catalog"
    assert span.parent_span_id == CALLER_SPAN
    assert span.attributes["http.route"] == "/catalog"
    assert span.attributes["http.response.status_code"] == 502
    assert span.error


async def test_a_caller_that_does_not_sample_gets_no_spans_but_its_trace_id_in_the_log(
    traced: tuple[httpx.AsyncClient, Lines], receiver: OtlpReceiver, minter: TokenMinter
) -> None:
    client, lines = traced
    unsampled = "6bf92f3577b34da6a3ce929d0e0e4738"
    response = await client.get(
        "/things/8",
        headers={
            "traceparent": f"00-{unsampled}-{CALLER_SPAN}-00",
            "authorization": f"Bearer {minter.token()}",
        },
    )
    assert response.status_code == 200
    sampled = "7bf92f3577b34da6a3ce929d0e0e4739"
    await client.get(
        "/things/9",
        headers={
            "traceparent": f"00-{sampled}-{CALLER_SPAN}-01",
            "authorization": f"Bearer {minter.token()}",
        },
    )
    flush_traces()
    # the later, sampled request's spans arrived, so the unsampled one's would have too
    receiver.wait_for(trace_of(sampled), within=10)
    assert [span for span in receiver.spans() if span.trace_id == unsampled] == []
    (line,) = [line for line in lines.lines if line["path"] == "/things/8"]
    assert line["trace_id"] == unsampled


async def get_thing(client: httpx.AsyncClient, minter: TokenMinter, flags: str) -> None:
    """`GET /things/5` as a caller whose trace has the sampled flag `flags`."""
    traceparent = f"00-{uuid.uuid4().hex}-{CALLER_SPAN}-{flags}"
    headers = {"traceparent": traceparent, "authorization": f"Bearer {minter.token()}"}
    assert (await client.get("/things/5", headers=headers)).status_code == 200


async def test_statements_of_an_unsampled_request_skip_the_asyncpg_instrumentation(
    traced: tuple[httpx.AsyncClient, Lines], minter: TokenMinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation import asyncpg as instrumented

    hydrated: list[str] = []
    original = instrumented._hydrate_span_from_args

    def counting(connection: Any, query: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        hydrated.append(query)
        result: dict[str, Any] = original(connection, query, *args, **kwargs)
        return result

    monkeypatch.setattr(instrumented, "_hydrate_span_from_args", counting)
    client, _ = traced

    await get_thing(
        client, minter, "00"
    )  # the caller did not sample: its SELECT is not even looked at
    assert hydrated == []
    await get_thing(client, minter, "01")
    assert "SELECT 1" in hydrated


SAMPLERS = [
    (name, ratio)
    for root in ("always_on", "always_off", "traceidratio")
    for name in (root, f"parentbased_{root}")
    for ratio in ((0.0, 0.1, 0.5, 1.0) if root == "traceidratio" else (0.1,))
]


@pytest.mark.parametrize(("name", "ratio"), SAMPLERS)
def test_the_head_decision_is_the_samplers_own(name: str, ratio: float) -> None:
    """What the middleware decides before it makes a span is what the sampler
    decides, for a trace that starts here and under every kind of parent."""
    head = head_sampling(
        ServiceSettings(otel_traces_sampler=name, otel_traces_sampler_arg=ratio, _env_file=None)
    )
    rng = random.Random(17)
    parents = [INVALID_SPAN_CONTEXT] + [
        SpanContext(rng.getrandbits(128) or 1, 5, is_remote=remote, trace_flags=TraceFlags(flags))
        for remote in (True, False)
        for flags in (0, 1, 2, 3)
    ]
    for parent in parents:
        context = trace.set_span_in_context(NonRecordingSpan(parent))
        for _ in range(200):
            trace_id = parent.trace_id if parent.is_valid else rng.getrandbits(128)
            decision = head.sampler.should_sample(context, trace_id, "GET", SpanKind.SERVER)
            recorded = decision.decision in (Decision.RECORD_ONLY, Decision.RECORD_AND_SAMPLE)
            assert head.records(parent, trace_id) == recorded


class Seen:
    """A plain ASGI app that notes the span context current while it runs."""

    def __init__(self) -> None:
        self.contexts: list[SpanContext] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.contexts.append(trace.get_current_span().get_span_context())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_a_request_is_sampled_by_the_trace_id_it_carries_and_unsampled_ones_get_valid_ids(
    traced: tuple[httpx.AsyncClient, Lines],
) -> None:
    """Under the ratio sampler, whether a request's span records follows its
    own trace id (the one decided on is the one the span gets), and a request
    that is not sampled still carries fresh, valid ids with the unsampled flag."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    head = head_sampling(
        ServiceSettings(otel_traces_sampler="traceidratio", otel_traces_sampler_arg=0.5)
    )
    tracer = TracerProvider(
        resource=provider.resource, sampler=RequestRootSampler(head.sampler, head)
    ).get_tracer("test")
    seen = Seen()
    transport = httpx.ASGITransport(app=TracingMiddleware(seen, tracer=tracer))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(100):
            assert (await client.get("/catalog/products/3")).status_code == 204
    recorded = [span.trace_flags.sampled for span in seen.contexts]
    assert 0 < sum(recorded) < 100
    for span in seen.contexts:
        assert span.is_valid
        assert not span.is_remote
        assert span.trace_flags.sampled == head.records(INVALID_SPAN_CONTEXT, span.trace_id)
    assert len({span.trace_id for span in seen.contexts}) == 100


async def test_an_unsampled_caller_is_continued_with_its_trace_id_and_state(
    traced: tuple[httpx.AsyncClient, Lines],
) -> None:
    seen = Seen()
    transport = httpx.ASGITransport(app=TracingMiddleware(seen))
    headers = {
        "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-02",
        "tracestate": "vendor=a1",
    }
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/catalog/products/3", headers=headers)).status_code == 204
    (span,) = seen.contexts
    assert format(span.trace_id, "032x") == CALLER_TRACE
    assert format(span.span_id, "016x") != CALLER_SPAN
    assert not span.trace_flags.sampled
    assert span.trace_flags.random_trace_id
    assert span.trace_state.to_header() == "vendor=a1"


async def test_commands_of_an_unsampled_request_skip_the_redis_instrumentation(
    traced: tuple[httpx.AsyncClient, Lines], minter: TokenMinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation import redis as instrumented

    named: list[str] = []
    original = instrumented._build_span_name  # type: ignore[attr-defined]

    def counting(instance: Any, args: Any) -> str:
        name: str = original(instance, args)
        named.append(name)
        return name

    monkeypatch.setattr(instrumented, "_build_span_name", counting)
    client, _ = traced

    await get_thing(client, minter, "00")  # the caller did not sample: its GET makes no span at all
    assert named == []
    await get_thing(client, minter, "01")
    assert "GET" in named


def recorded_by(kit_spans: bool) -> tuple[trace.Tracer, InMemorySpanExporter]:
    """A tracer keeping every trace, with kit's server spans (the sampler
    `configure_tracing` installs) or with the SDK's (any other sampler)."""
    head = head_sampling(ServiceSettings(otel_traces_sampler="parentbased_always_on"))
    sampler = RequestRootSampler(head.sampler, head) if kit_spans else head.sampler
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("kit.tracing"), exporter


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    span = trace.get_current_span()
    span.set_attribute("app.note", "written by the app")
    span.set_attribute("url.scheme", "ftp")  # kit's own write, at the end, wins
    span.set_attribute("bad", object())  # type: ignore[arg-type] # checked as the SDK checks
    span.add_event("checkpoint", {"step": 1})
    span.add_link(SpanContext(int(OTHER_TRACE, 16), 9, is_remote=True), {"why": "batch"})
    scope[ROUTE_TEMPLATE_KEY] = "/things/{thing_id}"
    if scope["path"].endswith("/boom"):
        raise RuntimeError("boom")
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def comparable(span: ReadableSpan) -> dict[str, Any]:
    def event(event: Any) -> tuple[str, dict[str, Any]]:
        attributes = dict(event.attributes)
        attributes.pop("exception.stacktrace", None)  # the frames differ, not the shape
        return event.name, attributes

    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent,
        "trace_state": span.context.trace_state,
        "sampled": span.context.trace_flags.sampled,
        "remote": span.context.is_remote,
        "attributes": dict(span.attributes or {}),
        "status": (span.status.status_code, span.status.description),
        "events": [event(e) for e in span.events],
        "links": [(link.context, dict(link.attributes or {})) for link in span.links],
        "scope": span.instrumentation_scope,
        "resource": span.resource,
        "ended": span.end_time is not None and span.start_time is not None,
        "stacktrace": [bool((e.attributes or {}).get("exception.stacktrace")) for e in span.events],
    }


async def test_kits_spans_reach_a_batch_processor_and_one_added_later() -> None:
    """A batch processor gets kit's spans queued directly (what its on_end
    does), and a processor added to the provider after the tracer was made
    gets every span from then on, as the SDK's spans would reach it."""
    head = head_sampling(ServiceSettings(otel_traces_sampler="parentbased_always_on"))
    provider = TracerProvider(sampler=RequestRootSampler(head.sampler, head))
    batched = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(batched))
    tracer = provider.get_tracer("kit.tracing")
    transport = httpx.ASGITransport(app=TracingMiddleware(failing_app, tracer=tracer))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/things/1")).status_code == 201
        later = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(later))
        assert (await client.get("/things/2")).status_code == 201
    provider.force_flush()

    def paths(exporter: InMemorySpanExporter) -> list[Any]:
        return [(span.attributes or {})["url.path"] for span in exporter.get_finished_spans()]

    assert paths(batched) == ["/things/1", "/things/2"]
    assert paths(later) == ["/things/2"]
    provider.shutdown()


async def test_kits_server_span_records_what_the_sdks_span_records() -> None:
    """The same requests through the middleware with kit's server span and
    with the SDK's: the same exported spans, app writes and failures included."""
    exported: dict[bool, list[dict[str, Any]]] = {}
    for kit_spans in (True, False):
        tracer, exporter = recorded_by(kit_spans)
        transport = httpx.ASGITransport(
            app=TracingMiddleware(failing_app, tracer=tracer), raise_app_exceptions=False
        )
        headers = {
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "tracestate": "vendor=a1",
        }
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/things/1", headers=headers)).status_code == 201
            assert (await client.get("/things/boom")).status_code == 500
        spans = exporter.get_finished_spans()
        assert isinstance(spans[0], LeanSpan) is kit_spans
        if kit_spans:  # handed over ended, as a ReadableSpan: a late write changes nothing
            ended = spans[0]
            assert isinstance(ended, ReadableSpan)
            assert isinstance(ended, LeanSpan)
            as_ended = comparable(ended)
            ended.set_attribute("late", 1)
            ended.update_name("renamed")
            ended.add_event("late")
            ended.set_status(Status(StatusCode.ERROR))
            assert comparable(ended) == as_ended
        exported[kit_spans] = [comparable(span) for span in spans]
    for mine, sdks in zip(exported[True], exported[False], strict=True):
        for key in mine:
            assert (key, mine[key]) == (key, sdks[key])
    ok, failed = exported[True]
    assert ok["attributes"]["url.scheme"] == "http"
    assert ok["attributes"]["app.note"] == "written by the app"
    assert failed["status"][0] == StatusCode.ERROR
    assert [name for name, _ in failed["events"]] == ["checkpoint", "exception"]
