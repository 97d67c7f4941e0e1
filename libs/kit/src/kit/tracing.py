"""OpenTelemetry tracing: set up once per process from the standard `OTEL_*`
variables, and a pure-ASGI middleware that opens each request's server span.

Tracing is on when an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and
neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says
otherwise. Off, nothing is installed: no provider, no instrumentation, no
middleware, so it costs nothing. On:

- a `TracerProvider` with the service's resource (`service.name`,
  `service.instance.id` = the replica's `NODE_ID`; `OTEL_SERVICE_NAME` and
  `OTEL_RESOURCE_ATTRIBUTES` add or override), spans exported in batches
  (every `OTEL_BSP_SCHEDULE_DELAY` ms) over OTLP/HTTP (protobuf) with
  `OTEL_EXPORTER_OTLP_HEADERS`, encoded by kit's own encoder and posted
  with `http.client` over a kept-alive connection (`kit.otlp`).
  These come from the settings, so a `.env` file works for them as for every
  other setting; the SDK reads the rarer ones itself
  (`OTEL_EXPORTER_OTLP_TIMEOUT`, `_COMPRESSION`, `_CERTIFICATE`);
- the sampler of `OTEL_TRACES_SAMPLER` / `_ARG` (by default
  `parentbased_traceidratio` at 0.1: one trace in ten is kept where it
  starts, and a caller's sampled flag is followed), behind one rule of ours:
  a trace starts only at a request or a message (a server or consumer span).
  A Redis or SQL call with no request around it (heartbeats, readiness
  probes, pool pings) is not traced, or every replica would send a one-span
  trace every few seconds;
- the standard instrumentations of the drivers: asyncpg (every SQL statement,
  SQLAlchemy's included, runs through it) and redis's asyncio client, both
  skipped under a span that does not record (see `_when_recording`), and
  aiohttp's client (the gateway's upstream requests, with `traceparent`
  injected). They get their tracers from `LeanTracerProvider`, so their
  spans are kit's lean ones (below), and asyncpg's works out a statement's
  attributes once per statement (`_statement_attributes`);
- `TracingMiddleware` on every app: one server span per request or WebSocket
  session, continuing the caller's W3C `traceparent` or starting a trace,
  named by the route template (`GET /catalog/products/{product_id}`), with the
  stable HTTP semantic conventions' attributes.

The server span is kit's own, for what it costs. FastAPI's own OpenTelemetry
support (FastAPI 0.165+) cost get-by-id about 400 us of CPU per request in
process against 340 us for this middleware with the SDK's spans (215 us off),
and opentelemetry-instrumentation-asgi about 110 us for the middleware alone;
FastAPI's spans are switched off wherever this middleware is on
(`quiet_fastapi_tracing`), or each request would have two.

Most of what tracing cost a request was the SDK's own work, in Python, so
kit does without most of it:

- the sampling decision comes first, before any span is made: the
  configured sampler's own rule, taken on the trace id the span will have
  (`HeadSampling`, checked against the sampler in the tests). A request that
  is not sampled gets a span that only carries its context (valid ids, the
  unsampled flag), as the SDK's tracer would make it, without the tracer;
- a recorded span is a `LeanSpan`: the request's server span, and the
  drivers' spans through `LeanTracer` (what the standard instrumentations
  get in place of the SDK's tracer). Attributes known valid (kit's own, the
  plain ones an instrumentation starts a span with) in a plain dict, no
  lock; ended, it is itself the `ReadableSpan` the SDK's span would copy
  itself into, with the same fields (the tests run the same requests, SQL
  statements and Redis commands through both and compare what is exported).
  A span with links, or a tracer the SDK configures otherwise (its own span
  metrics on), is the SDK's;
- what a request's span costs is mostly calls into code run once per
  request, whose cache misses cost more than the work they do: measured on
  the catalog's get-by-id, the request thread's tracing cost 10x its
  micro-benchmark (starting an unsampled span: 13-16 us of thread CPU a
  request against 1.3 us in a loop in the same process). So the request's
  path makes few: the current context is read and set as the API does it
  but without its layers (`_current_span`, `_attach_span`, `_detach`),
  ids are drawn as the SDK's generator draws them, the sampling decision is
  taken inline, a batch processor's `on_end` (queueing the span) is done
  directly, and its empty `on_start` skipped (`_Processors`, worked out
  again whenever the provider's processors change). A recorded get-by-id
  with its SQL statement made 124 Python calls into tracing's code (kit's
  and OpenTelemetry's) and makes 59; an unsampled one 43, now 24 (12 of each
  are FastAPI's own telemetry checks, made with tracing off too). The
  statement's span is made in the asyncpg instrumentation's wrapper itself
  (`_lean_execute`), without the layers of its context manager;
- the export encodes spans straight to protobuf bytes (`kit.otlp`), each
  repeated attribute, name and status once, about an eighth of the SDK
  encoder's time, in the thread that competes with the requests for the GIL
  (in the same process, pinned to one core: its CPU is the requests' CPU),
  and posts them with `http.client` over one kept-alive connection, not
  `requests` (about a third of its CPU a batch; the SDK's client, settings
  and retries around it are kept);
- the asyncpg instrumentation's span name (the statement's first word, which
  it takes by splitting the whole statement on every execution) is worked out
  once per statement (`_StatementNames`).

In a micro-benchmark (loaded machine, best of 40) the middleware costs
about 5 us per unsampled request (9 us with the SDK's tracer), about 14 us
per recorded one (40 us), and encoding a server span about 19 us (70 us),
since cut to 4-5 us.
A SQL statement through the asyncpg instrumentation (its wrapper and span,
not the query) costs about 14 us with kit's tracer and remembered
attributes, 23 us with kit's tracer alone, and 51 us with the SDK's tracer;
the span alone 10 us against 35 (loaded machine, best of 8 rounds).

Where a recorded get-by-id's tracing goes (2026-12-02): in a
micro-benchmark, the middleware, its span and the batch processor about
8.5 us (best of 15, no export); in process (the catalog's ASGI app driven
32 requests at a time, no HTTP), the export thread 9.3-10.2 us a request
(encoding about 7 us a span, posting 1.0-1.2 us a span with `http.client`,
3.5-4.6 us with `requests`). Profiled there on against off, the request
thread's extra time outside tracing's own functions sat in calls that
release the GIL, made as often either way: the socket sends to PostgreSQL
10 us a request longer, `os.urandom` (the request id) 9.6 us (wall time,
under the profiler, load average 3-5). That is where a thread waits to
take the GIL back: the event loop waiting while the export thread holds it
(10-15 us of the export thread's CPU a request), which is also where
py-spy's samples of on against off had put the difference (uvicorn's send,
the middlewares); no work of the request thread's own was found there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from random import getrandbits
from types import MappingProxyType, TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace import propagation as trace_propagation
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import Attributes, AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.observe import UNMATCHED, route_of
from kit.settings import ServiceSettings

logger = logging.getLogger("kit.tracing")

# The current context, read and set as the API's functions do it (the
# contextvars runtime context: a ContextVar holding a `Context`), without
# their four or five calls deep: on a request's path, each call into code run
# once per request costs more than the work it does (its cache misses). The
# API's own functions where the runtime context is another.
_RUNTIME = getattr(otel_context, "_RUNTIME_CONTEXT", None)
_CURRENT: ContextVar[Context] | None = (
    _RUNTIME._current_context
    if type(_RUNTIME) is ContextVarsRuntimeContext
    and isinstance(getattr(_RUNTIME, "_current_context", None), ContextVar)
    and isinstance(getattr(trace_propagation, "_SPAN_KEY", None), str)
    else None
)
_SPAN_KEY: str = getattr(trace_propagation, "_SPAN_KEY", "")


def _current_span(context: Context | None = None) -> trace.Span:
    """`trace.get_current_span(context)`."""
    if _CURRENT is None:
        return trace.get_current_span(context)
    span = (_CURRENT.get() if context is None else context).get(_SPAN_KEY)
    return span if isinstance(span, trace.Span) else INVALID_SPAN


def _attach_span(span: trace.Span) -> Token[Context]:
    """`otel_context.attach(trace.set_span_in_context(span))`."""
    if _CURRENT is None:
        return otel_context.attach(trace.set_span_in_context(span))
    values = _CURRENT.get().copy()
    values[_SPAN_KEY] = span
    return _CURRENT.set(Context(values))


def _detach(token: Token[Context]) -> None:
    """`otel_context.detach(token)`."""
    if _CURRENT is None:
        otel_context.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except Exception:  # as the API's: logged, never raised into the request
        logger.exception("Failed to detach context")


UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes: every few seconds from every checker, never worth a trace."""
SUPPORTED_PROTOCOLS = ("http/protobuf",)
TRACES_PATH = "v1/traces"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the `OTEL_*` settings ask for: an OTLP endpoint, the console, or nothing."""

    exporter: str  # "otlp", "console" or "none"
    endpoint: str | None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.exporter == "console" or (self.exporter == "otlp" and bool(self.endpoint))


def tracing_config(settings: ServiceSettings) -> TracingConfig:
    """Reads the decision from the settings; raises ValueError on a protocol
    this build cannot speak, so a typo stops the service at start-up."""
    exporters = [name.strip().lower() for name in settings.otel_traces_exporter.split(",")]
    if settings.otel_sdk_disabled or "none" in exporters:
        return TracingConfig("none", None)
    if "console" in exporters:
        return TracingConfig("console", None)
    if exporters != ["otlp"]:
        raise ValueError(f"OTEL_TRACES_EXPORTER={settings.otel_traces_exporter!r}: use otlp, none")
    protocol = settings.otel_exporter_otlp_traces_protocol or settings.otel_exporter_otlp_protocol
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported: use http/protobuf (port 4318)"
        )
    endpoint = settings.otel_exporter_otlp_traces_endpoint
    if endpoint is None and settings.otel_exporter_otlp_endpoint is not None:
        # the per-signal path is appended only to the generic endpoint (OTLP spec)
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/" + TRACES_PATH
    headers = parse_env_headers(settings.otel_exporter_otlp_headers or "", liberal=True)
    return TracingConfig("otlp" if endpoint else "none", endpoint, dict(headers))


def sampler_for(settings: ServiceSettings) -> Sampler:
    """`OTEL_TRACES_SAMPLER` and `_ARG`, by the specification's names."""
    return head_sampling(settings).sampler


@dataclass(frozen=True, slots=True)
class HeadSampling:
    """The configured sampler, and its decision for a request's span in a few
    operations: what `TracingMiddleware` asks before it makes any span, so an
    unsampled request costs no more than a context. Every sampler here decides
    a request's span by its parent's sampled flag (the `parentbased_` ones,
    when there is a parent) or by the trace id's low 64 bits under a bound
    (`traceidratio`'s; `always_on`'s takes every id, `always_off`'s none).
    `records` takes that decision with the sampler's own bound."""

    sampler: Sampler
    parent_based: bool
    bound: int

    def records(self, parent: SpanContext, trace_id: int) -> bool:
        """Whether the sampler records a server span under `parent` (an invalid
        one for a trace that starts here) with `trace_id`."""
        if self.parent_based and parent.is_valid:
            return parent.trace_flags.sampled
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self.bound


def head_sampling(settings: ServiceSettings) -> HeadSampling:
    """The sampler of `OTEL_TRACES_SAMPLER` and `_ARG` (see `HeadSampling`)."""
    name = settings.otel_traces_sampler.strip().lower()
    ratio = TraceIdRatioBased(settings.otel_traces_sampler_arg)
    roots: dict[str, tuple[Sampler, int]] = {
        "always_on": (ALWAYS_ON, TraceIdRatioBased.TRACE_ID_LIMIT + 1),
        "always_off": (ALWAYS_OFF, 0),
        "traceidratio": (ratio, ratio.bound),
    }
    if name in roots:
        root, bound = roots[name]
        return HeadSampling(root, parent_based=False, bound=bound)
    if name.startswith("parentbased_") and name.removeprefix("parentbased_") in roots:
        root, bound = roots[name.removeprefix("parentbased_")]
        return HeadSampling(ParentBased(root), parent_based=True, bound=bound)
    raise ValueError(
        f"OTEL_TRACES_SAMPLER={settings.otel_traces_sampler!r}: use always_on, always_off,"
        " traceidratio or their parentbased_ forms"
    )


class RequestRootSampler(Sampler):
    """The configured sampler, for spans that may start a trace: a root span
    must be a server or consumer span; anything else without a parent is dropped."""

    def __init__(self, delegate: Sampler, head: HeadSampling | None = None) -> None:
        self.delegate = delegate
        self.head = head

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and kind not in (SpanKind.SERVER, SpanKind.CONSUMER):
            return SamplingResult(Decision.DROP)
        return self.delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RequestRoot{{{self.delegate.get_description()}}}"


_lock = threading.Lock()
_provider: TracerProvider | None = None


def tracing_enabled() -> bool:
    """Whether this process traces (see `configure_tracing`)."""
    return _provider is not None


def configure_tracing(settings: ServiceSettings, *, exporter: SpanExporter | None = None) -> bool:
    """Sets tracing up for the process from `settings` (or with `exporter`,
    for tests); returns whether tracing is on.

    Per process, not per app: the provider is global and the instrumentations
    patch the drivers' classes. The first call that turns tracing on sets it
    up, and from then on every call answers True (a service runs one app per
    process; a test process may build several).
    """
    global _provider
    with _lock:
        if _provider is not None:
            return True
        config = tracing_config(settings)
        if exporter is None and not config.enabled:
            return False
        if exporter is None:
            exporter = _exporter(config)
        head = head_sampling(settings)
        provider = TracerProvider(
            resource=_resource(settings),
            sampler=RequestRootSampler(head.sampler, head),
        )
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=settings.otel_bsp_schedule_delay)
        )
        trace.set_tracer_provider(provider)
        _instrument_drivers(provider)
        _provider = provider
    logger.info("tracing on: %s", config.endpoint or config.exporter)
    return True


def flush_traces(timeout_millis: int = 5000) -> None:
    """Sends what is queued now (tests); at exit the provider flushes by itself."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    from kit.otlp import LeanOTLPSpanExporter

    return LeanOTLPSpanExporter(endpoint=config.endpoint, headers=config.headers or None)


def _resource(settings: ServiceSettings) -> Resource:
    attributes: dict[str, Any] = {"service.instance.id": settings.node_id}
    # OTEL_RESOURCE_ATTRIBUTES adds to them and OTEL_SERVICE_NAME wins over all
    attributes.update(parse_env_headers(settings.otel_resource_attributes or "", liberal=True))
    attributes["service.name"] = settings.otel_service_name or settings.service_name
    return Resource.create(attributes)


def _instrument_drivers(sdk_provider: TracerProvider) -> None:
    """The standard instrumentations of whichever drivers this service has,
    their spans made by `LeanTracer`."""
    provider = LeanTracerProvider(sdk_provider)
    from opentelemetry.instrumentation import redis as redis_instrumentation

    # it makes a span for every command, under a span that does not record too
    # (the sampler drops it, after the work of naming it and starting it)
    for name in ("_async_traced_execute_factory", "_async_traced_execute_pipeline_factory"):
        factory = getattr(redis_instrumentation, name)
        setattr(redis_instrumentation, name, _recording_only(factory))
    redis_instrumentation.RedisInstrumentor().instrument(tracer_provider=provider)
    try:
        from opentelemetry.instrumentation import asyncpg as asyncpg_instrumentation
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    except ImportError:  # a service without a database (the gateway)
        pass
    else:
        # it works a statement's attributes out again for every statement
        hydrate = asyncpg_instrumentation._hydrate_span_from_args
        asyncpg_instrumentation._hydrate_span_from_args = _statement_attributes(hydrate)
        asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        # it works out a statement's attributes (a regular expression, the
        # connection's parameters) before it asks the sampler, so a statement of
        # an unsampled request would cost nearly as much as a recorded one
        for name in ("_do_cursor_execute", "_do_prepared_execute"):
            setattr(asyncpg, name, _when_recording(getattr(asyncpg, name)))
        asyncpg._do_execute = _lean_execute(asyncpg, asyncpg_instrumentation)  # type: ignore[method-assign,assignment]
        remover: Any = asyncpg._leading_comment_remover
        if not isinstance(remover, _StatementNames):
            asyncpg._leading_comment_remover = _StatementNames(remover)  # type: ignore[assignment]
        asyncpg.instrument(tracer_provider=provider)
    try:
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    except ImportError:  # only the gateway speaks aiohttp
        pass
    else:
        AioHttpClientInstrumentor().instrument(tracer_provider=provider)


Wrapper = Callable[[Callable[..., Awaitable[Any]], Any, Any, Any], Awaitable[Any]]
Hydrate = Callable[..., dict[str, Any]]
STATEMENTS_REMEMBERED = 1024
"""Distinct statements whose attributes are kept; the lot is dropped when full."""


def _statement_attributes(hydrate: Hydrate) -> Hydrate:
    """The asyncpg instrumentation's attributes of a statement
    (`_hydrate_span_from_args`), worked out once per statement and connection
    target. They depend only on the connection's database, user and address,
    the statement's text and the conventions' mode; a dozen calls and
    lookups for each statement (about a tenth of its span) otherwise. With
    the parameters captured (not kit's case) every call works them out."""
    remembered: dict[tuple[Any, ...], dict[str, Any]] = {}

    @functools.wraps(hydrate)
    def attributes(
        connection: Any, query: Any, parameters: Any, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        if parameters is not None or not isinstance(query, str):
            return hydrate(connection, query, parameters, *args, **kwargs)
        params = getattr(connection, "_params", None)
        address = getattr(connection, "_addr", None)
        key = (
            getattr(params, "database", None),
            getattr(params, "user", None),
            address if isinstance(address, tuple | str) else repr(address),
            query,
            args,
            tuple(kwargs.items()),
        )
        try:
            known = remembered.get(key)
        except TypeError:  # something unhashable in it: not remembered
            return hydrate(connection, query, parameters, *args, **kwargs)
        if known is None:
            if len(remembered) >= STATEMENTS_REMEMBERED:
                remembered.clear()
            known = remembered[key] = hydrate(connection, query, parameters, *args, **kwargs)
        return dict(known)  # the instrumentation's to keep: not the remembered one

    return attributes


def _lean_execute(instrumentor: Any, module: Any) -> Wrapper:
    """The asyncpg instrumentation's wrapper of a connection's `execute`,
    `executemany`, `fetch`, `fetchrow` and `fetchval` (`_do_execute`, what
    kit's point reads run through), in one frame: the same span (its name,
    attributes, error status, `error.type` and exception event, in the same
    order) made by kit's tracer directly, without the layers of the
    context manager the instrumentation opens. It steps aside as
    `_when_recording` does, and leaves the statement to the instrumentation's
    own wrapper for any other tracer, with instrumentation suppressed, or if
    this version of the instrumentation lacks what it uses."""
    own: Wrapper = instrumentor._do_execute
    report_new = getattr(module, "_report_new", None)
    error_type = getattr(module, "ERROR_TYPE", None)
    enabled = getattr(module, "is_instrumentation_enabled", None)
    if report_new is None or error_type is None or enabled is None:
        return _when_recording(own)

    async def execute(
        func: Callable[..., Awaitable[Any]], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if not _current_span().is_recording():
            return await func(*args, **kwargs)
        tracer = instrumentor._tracer
        if type(tracer) is not LeanTracer or not enabled():
            return await own(func, instance, args, kwargs)
        params = getattr(instance, "_params", None)
        name = args[0] if args[0] else getattr(params, "database", "postgresql")
        try:
            name = instrumentor._leading_comment_remover.sub("", name).split()[0]
        except IndexError:
            name = ""
        mode = instrumentor._semconv_opt_in_mode
        attributes = module._hydrate_span_from_args(
            instance,
            args[0],
            args[1:] if instrumentor.capture_parameters else None,
            semconv_opt_in_mode=mode,
        )
        span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        token = _attach_span(span)
        try:
            return await func(*args, **kwargs)
        except Exception as error:
            if span.is_recording():
                # the instrumentation's own marks, then its context manager's
                span.set_status(Status(StatusCode.ERROR))
                if report_new(mode):
                    span.set_attribute(error_type, type(error).__qualname__)
                span.record_exception(error)
                span.set_status(_error_of(error))
            raise
        finally:
            _detach(token)
            span.end()

    return execute


class _StatementNames:
    """What the asyncpg instrumentation names a statement's span by, once per
    statement: it takes `_leading_comment_remover.sub("", text).split()[0]`
    (the first word after a leading comment) on every execution, splitting
    the whole text. In its place, `sub` answers that first word alone
    (remembered per text), which the same expression turns into the same name
    (and "" into the same IndexError); any other use is the pattern's own."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self._names: dict[str, str] = {}

    def sub(self, replacement: Any, text: Any, count: int = 0) -> Any:
        if replacement != "" or count or type(text) is not str:
            return self.pattern.sub(replacement, text, count)
        name = self._names.get(text)
        if name is None:
            words = self.pattern.sub("", text).split(maxsplit=1)
            name = words[0] if words else ""
            if len(self._names) >= STATEMENTS_REMEMBERED:
                self._names.clear()
            self._names[text] = name
        return name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pattern, name)


def _recording_only(factory: Callable[..., Wrapper]) -> Callable[..., Wrapper]:
    """A factory of instrumentation wrappers whose wrappers step aside unless
    the current span records (see `_when_recording`)."""

    def made(*args: Any, **kwargs: Any) -> Wrapper:
        return _when_recording(factory(*args, **kwargs))

    return made


def _when_recording(wrapper: Wrapper) -> Wrapper:
    """An instrumentation's wrapper that steps aside unless the current span
    records. No span is lost, only the work of making one nobody records: under
    a span that does not record, every sampler here drops the child too (the
    `parentbased_` ones follow the parent, `traceidratio` decides alike for
    the same trace id; under `always_on` every request's span records), and a
    span with no parent is dropped (`RequestRootSampler`)."""

    async def lean(
        func: Callable[..., Awaitable[Any]], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if _current_span().is_recording():
            return await wrapper(func, instance, args, kwargs)
        return await func(*args, **kwargs)

    return lean


def quiet_fastapi_tracing(app: Any) -> None:
    """Switches off FastAPI's own server spans (FastAPI 0.165 and later), which
    `TracingMiddleware` replaces. FastAPI takes its telemetry settings only in
    its constructor, which every service calls itself, so they are set on the
    configuration mapping FastAPI reads on every request."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config["tracing"] = False


class _HeaderGetter(Getter[Iterable[tuple[bytes, bytes]]]):
    """Reads W3C headers straight from the ASGI header list."""

    def get(self, carrier: Iterable[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.encode()
        found = [value.decode("latin-1") for name, value in carrier if name == wanted]
        return found or None

    def keys(self, carrier: Iterable[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_getter = _HeaderGetter()


_PROPAGATED = frozenset({b"traceparent", b"tracestate", b"baggage"})
_NO_PARENT = Context()
"""The context of a request that carries none: a trace starts with it."""


def incoming_context(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The caller's trace context (traceparent, tracestate, baggage), on an
    empty context, so nothing left over in the current task becomes a parent."""
    carried = [(name, value) for name, value in headers if name in _PROPAGATED]
    if not carried:
        return _NO_PARENT  # most requests: nothing for the propagators to read
    return propagate.extract(carried, context=Context(), getter=_getter)


def span_attributes(scope: Scope, method: str, status: int) -> dict[str, Any]:
    """The request's attributes, by the stable HTTP semantic conventions: the
    required ones and `client.address`. Each attribute costs a span about as
    much again to record and encode as the span itself, so not the opt-in
    request headers: the request id is on the access log line, with the trace id."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
    }
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    route = route_of(scope)
    if route != UNMATCHED:
        attributes["http.route"] = route
    if status:
        attributes["http.response.status_code"] = status
    return attributes


_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RANDOM_UNSAMPLED = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_RANDOM_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


class _Processors:
    """The tracer's span processors as a span of kit's meets them: the SDK's
    `SynchronousMultiSpanProcessor`, with what its batch processors do for a
    sampled span done directly (`on_start` does nothing, `on_end` queues the
    span) rather than through two calls each. Worked out again whenever the
    provider's list of processors changes (a processor added later gets its
    spans)."""

    __slots__ = ("_ends", "_processors", "_seen", "_starts")

    def __init__(self, processor: SpanProcessor) -> None:
        self._processors = processor
        self._seen: object = _Processors  # nothing seen yet
        self._starts: tuple[SpanProcessor, ...] = ()
        self._ends: tuple[Callable[[ReadableSpan], None], ...] = ()

    def _current(self, listed: Any) -> None:
        if not isinstance(self._processors, SynchronousMultiSpanProcessor) or listed is None:
            self._starts, self._ends = (self._processors,), (self._processors.on_end,)
        else:
            starts, ends = [], []
            for processor in listed:
                emit = getattr(getattr(processor, "_batch_processor", None), "emit", None)
                if type(processor) is BatchSpanProcessor and emit is not None:
                    ends.append(emit)  # what its on_end does with a sampled span
                else:
                    starts.append(processor)
                    ends.append(processor.on_end)
            self._starts, self._ends = tuple(starts), tuple(ends)
        self._seen = listed

    def on_start(self, span: LeanSpan, context: Context | None) -> None:
        listed = getattr(self._processors, "_span_processors", None)
        if listed is not self._seen:
            self._current(listed)
        for processor in self._starts:
            processor.on_start(span, parent_context=context)  # type: ignore[arg-type]

    def on_end(self, span: LeanSpan) -> None:
        listed = getattr(self._processors, "_span_processors", None)
        if listed is not self._seen:
            self._current(listed)
        for end in self._ends:
            end(span)


_UNSET = Status(StatusCode.UNSET)
"""Every span's status until one is set (a `Status` never changes: one for all)."""
_NEW_TRACE_KINDS = (SpanKind.SERVER, SpanKind.CONSUMER)
_PLAIN_VALUES = frozenset({str, int, float, bool})


@dataclass(frozen=True, slots=True)
class _LeanSpans:
    """What it takes to make spans without the SDK's tracer, from a tracer
    made by `configure_tracing`: its head sampling, ids, processors, resource
    and scope. `TracingMiddleware` makes each request's span with it, and
    `LeanTracer` the drivers' spans."""

    head: HeadSampling
    ids: IdGenerator
    processor: _Processors
    resource: Resource
    scope: InstrumentationScope
    limits: SpanLimits
    random_ids: bool = False
    """`ids` is the SDK's `RandomIdGenerator`: its ids are drawn here, without its calls."""

    def start(
        self,
        name: str,
        context: Context | None,
        kind: SpanKind = SpanKind.SERVER,
        attributes: Attributes = None,
        start_time: int | None = None,
        on_exception: tuple[bool, bool] = (True, True),
    ) -> trace.Span:
        """A span under `context`'s: recording when the sampler keeps it, else
        one that only carries the context (valid ids, the unsampled flag). The
        decision is the tracer's own sampler's (see `HeadSampling` and
        `RequestRootSampler`), taken on the trace id the span has: the
        parent's, or a new one. `on_exception` says whether the span, used as
        a context manager, records an exception and sets the error status (the
        SDK's `record_exception` and `set_status_on_exception`)."""
        if context is _NO_PARENT:
            parent = INVALID_SPAN_CONTEXT
        else:
            parent = _current_span(context).get_span_context()
        ids = self.ids
        head = self.head
        valid = parent.is_valid
        if valid:
            trace_id, parent_flags = parent.trace_id, parent.trace_flags
            random_id = parent_flags.random_trace_id
            trace_state: trace.TraceState | None = parent.trace_state
            # `HeadSampling.records`: the parent's flag, or the trace id's bound
            records = (
                parent_flags.sampled
                if head.parent_based
                else trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < head.bound
            )
        else:
            trace_state = None
            if self.random_ids:  # as the generator draws them (0 is not an id)
                trace_id, random_id = getrandbits(128) or ids.generate_trace_id(), True
            else:
                trace_id, random_id = ids.generate_trace_id(), ids.is_trace_id_random()
            # only a request or a message starts a trace (RequestRootSampler),
            # by the trace id alone (`HeadSampling.records` with no parent)
            records = (
                kind in _NEW_TRACE_KINDS
                and trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < head.bound
            )
        span_id = (self.random_ids and getrandbits(64)) or ids.generate_span_id()
        if not records:
            flags = _RANDOM_UNSAMPLED if random_id else _UNSAMPLED
            return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, trace_state))
        flags = _RANDOM_SAMPLED if random_id else _SAMPLED
        span_context = SpanContext(trace_id, span_id, False, flags, trace_state)
        span = LeanSpan(name, span_context, parent if valid else None, self, kind, start_time)
        if attributes:
            span.set_start_attributes(attributes)
        span.on_exception = on_exception
        # the processors see a span, as the SDK's; only its context and
        # attributes are read at the start (the batch processor reads nothing,
        # and alone, is not called)
        processor = self.processor
        listed = getattr(processor._processors, "_span_processors", None)
        if processor._starts or listed is not processor._seen:
            processor.on_start(span, context)
        return span


def _lean_spans(tracer: trace.Tracer) -> _LeanSpans | None:
    """How to make spans for a tracer made by `configure_tracing`; None for
    any other (its spans are then the tracer's own)."""
    if not isinstance(tracer, SdkTracer):
        return None
    sampler = tracer.sampler
    if not isinstance(sampler, RequestRootSampler) or sampler.head is None:
        return None
    if not isinstance(getattr(tracer, "_tracer_metrics", None), NoOpTracerMetrics):
        return None  # the SDK's own metrics of spans are asked for: its spans count them
    scope = getattr(tracer, "_instrumentation_scope", None)
    if not isinstance(scope, InstrumentationScope):  # the scope's attributes with it
        info = tracer.instrumentation_info
        scope = InstrumentationScope(info.name, info.version, info.schema_url)
    limits = getattr(tracer, "_span_limits", None)
    return _LeanSpans(
        sampler.head,
        tracer.id_generator,
        _Processors(tracer.span_processor),
        tracer.resource,
        scope,
        limits if isinstance(limits, SpanLimits) else SpanLimits(),
        type(tracer.id_generator) is RandomIdGenerator,
    )


def _bounded(limits: SpanLimits, count: int | None, attributes: Attributes) -> BoundedAttributes:
    """An event's or a link's attributes, within the span limits (as the SDK bounds them)."""
    return BoundedAttributes(
        count, attributes, max_value_len=limits.max_attribute_length, immutable=True
    )


def _plain(attributes: Mapping[str, Any], limits: SpanLimits) -> bool:
    """Whether the SDK would keep `attributes` exactly as they are: named by
    non-empty strings, plain scalar values, within the span limits (what an
    instrumentation passes when it starts a span)."""
    if limits.max_span_attribute_length is not None or (
        limits.max_span_attributes is not None and len(attributes) > limits.max_span_attributes
    ):
        return False
    for key, value in attributes.items():
        if type(key) is not str or not key or type(value) not in _PLAIN_VALUES:
            return False
    return True


class LeanSpan(trace.Span, ReadableSpan):
    """A recorded span made without the SDK's tracer: a request's server span
    (`TracingMiddleware`) or a driver's client span (`LeanTracer`). The SDK's
    span takes a lock and checks every value on each write, keeps bounded
    containers for attributes, events and links that these spans hardly use,
    and copies itself into a `ReadableSpan` when it ends; for a request or a
    SQL statement that is most of what recording it costs. This one keeps
    attributes known valid (kit's own, plain ones passed at the start) in a
    plain dict, checks only what other code writes (as the SDK does, within
    the span limits), and, being a `ReadableSpan` itself with the fields the
    SDK's copy would have, is handed to the span processors as it is when it
    ends (nothing writes to an ended span)."""

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        spans: _LeanSpans,
        kind: SpanKind = SpanKind.SERVER,
        start_time: int | None = None,
    ) -> None:
        # ReadableSpan's fields, as its constructor sets them
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_info = None
        self._instrumentation_scope = spans.scope
        self._parent = parent
        self._start_time = start_time if start_time is not None else time.time_ns()
        self._end_time: int | None = None
        self._attributes: dict[str, AttributeValue] = {}
        """Attributes known valid; once ended, all of them (see `end`)."""
        self._events: BoundedList[Event] | None = None  # type: ignore[assignment]
        self._links: BoundedList[Link] | None = None  # type: ignore[assignment]
        self._resource = spans.resource
        self._status = _UNSET
        # the span's own
        self._spans = spans
        self._others: BoundedAttributes | None = None
        self.on_exception = (True, True)
        """Used as a context manager: whether to record an exception, and to set the error status."""

    @property
    def attributes(self) -> Mapping[str, AttributeValue]:
        # what a span processor may read of a started span; once ended, the
        # ReadableSpan's read-only view
        if self._end_time is None:
            return self._merged()
        return MappingProxyType(self._attributes or {})

    def set_start_attributes(self, attributes: Mapping[str, Any]) -> None:
        """The attributes a span starts with: kept as they are when the SDK
        would keep them so (see `_plain`), else checked as it checks them."""
        if self._others is None and not self._attributes and _plain(attributes, self._spans.limits):
            self._attributes.update(attributes)
        else:
            self.set_attributes(attributes)

    def set_own_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """kit's attributes, by the semantic conventions' types: not checked again."""
        if self._others is not None:
            self.set_attributes(attributes)  # after others' writes: in their order
        elif self._end_time is None:
            self._attributes.update(attributes)

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set here

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end_time is not None:
            return
        if self._others is None:
            limits = self._spans.limits
            self._others = BoundedAttributes(
                limits.max_span_attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        for key, value in attributes.items():
            self._others[key] = value
            self._attributes.pop(key, None)  # the latest write wins

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            return
        limits = self._spans.limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        bounded = _bounded(limits, limits.max_event_attributes, attributes)
        self._events.append(Event(name, bounded, timestamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is not None or (not context.is_valid and not attributes):
            return  # the SDK too drops a link with neither a valid context nor attributes
        limits = self._spans.limits
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        bounded = _bounded(limits, limits.max_link_attributes, attributes)
        self._links.append(Link(context, bounded))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # as the SDK's: OK is final, UNSET never replaces anything
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The SDK's `exception` event, with the same attributes."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, AttributeValue] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        limits = self._spans.limits
        if (
            self._others is not None
            or limits.max_span_attribute_length is not None
            or (
                limits.max_span_attributes is not None
                and len(self._attributes) > limits.max_span_attributes
            )
        ):  # others' writes, or limits to apply: all of it the SDK's way
            self._attributes, self._others = self._merged(), None  # type: ignore[assignment]
        if self._events is None:
            self._events = ()  # type: ignore[assignment]
        if self._links is None:
            self._links = ()  # type: ignore[assignment]
        self._end_time = end_time if end_time is not None else time.time_ns()
        processor = self._spans.processor
        if getattr(processor._processors, "_span_processors", None) is not processor._seen:
            processor.on_end(self)  # they changed: worked out again
        else:
            for end in processor._ends:
                end(self)

    def _merged(self) -> Mapping[str, AttributeValue]:
        """All the attributes: the ones known valid, and others' writes
        checked the SDK's way, or all of them when span limits apply."""
        limits = self._spans.limits
        if self._others is None and (
            limits.max_span_attribute_length is None
            and (
                limits.max_span_attributes is None
                or len(self._attributes) <= limits.max_span_attributes
            )
        ):
            return self._attributes
        merged = BoundedAttributes(
            limits.max_span_attributes,
            self._attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        for key, value in (self._others or {}).items():
            merged[key] = value
        return merged

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """As the SDK's span: records what escapes `with span:`, then ends."""
        if exc_val is not None and self.is_recording():
            record, set_status = self.on_exception
            if record:
                self.record_exception(exc_val, escaped=True)
            if set_status:
                self.set_status(_error_of(exc_val))
        self.end()


def _error_of(error: BaseException) -> Status:
    """The status the SDK gives a span an exception escapes."""
    return Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")


class LeanTracer(trace.Tracer):
    """The SDK tracer of an instrumentation (asyncpg's, redis's, aiohttp's),
    making its spans as `LeanSpan`s: the same sampling, ids, processors and
    exported spans, for a fraction of the SDK's work per span (a SQL
    statement's span was most of what tracing a get-by-id still cost). A span
    with links, or a tracer the SDK configures otherwise, is the SDK's."""

    def __init__(self, tracer: SdkTracer, spans: _LeanSpans) -> None:
        self.tracer = tracer
        self._spans = spans

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if links or not self.tracer._is_enabled():
            return self.tracer.start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        return self._spans.start(
            name, context, kind, attributes, start_time, (record_exception, set_status_on_exception)
        )

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> _CurrentSpan:
        """As the SDK's (`start_span`, then `trace.use_span`), as a plain
        context manager rather than a generator's: the span starts on entry."""
        return _CurrentSpan(
            self,
            (name, context, kind, attributes, links, start_time),
            (record_exception, set_status_on_exception),
            end_on_exit,
        )


class _CurrentSpan:
    """`LeanTracer.start_as_current_span`: `with` starts the span and makes it
    current, and on the way out does what `trace.use_span` does. Used as a
    decorator, it is the SDK tracer's (a new span for every call)."""

    __slots__ = ("_end", "_on_exception", "_span", "_start", "_token", "_tracer")

    def __init__(
        self,
        tracer: LeanTracer,
        start: tuple[str, Context | None, SpanKind, Attributes, Sequence[Link] | None, int | None],
        on_exception: tuple[bool, bool],
        end_on_exit: bool,
    ) -> None:
        self._tracer = tracer
        self._start = start
        self._on_exception = on_exception
        self._end = end_on_exit

    def __enter__(self) -> trace.Span:
        span = self._tracer.start_span(*self._start, *self._on_exception)
        self._span = span
        self._token = _attach_span(span)
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        span = self._span
        _detach(self._token)
        # as use_span: an Exception only (not a cancellation), on a recording span
        try:
            if isinstance(exc_val, Exception) and span.is_recording():
                record, set_status = self._on_exception
                if record:
                    span.record_exception(exc_val)
                if set_status:
                    span.set_status(_error_of(exc_val))
        finally:
            if self._end:
                span.end()

    def __call__(self, function: Callable[..., Any]) -> Callable[..., Any]:
        name, context, kind, attributes, links, start_time = self._start
        record, set_status = self._on_exception
        decorate: Callable[[Callable[..., Any]], Callable[..., Any]] = (
            self._tracer.tracer.start_as_current_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record,
                set_status,
                self._end,
            )
        )
        return decorate(function)


class LeanTracerProvider(trace.TracerProvider):
    """The SDK provider, handing out `LeanTracer`s: what the drivers'
    instrumentations are given, so their spans are lean too."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        tracer = self.provider.get_tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        spans = _lean_spans(tracer)
        if spans is None or not isinstance(tracer, SdkTracer):
            return tracer
        return LeanTracer(tracer, spans)


class TracingMiddleware:
    """One server span per HTTP request or WebSocket session, continuing the
    caller's trace; current while the app runs, so every span below is its child."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer: trace.Tracer | None = None,
        untraced_paths: Iterable[str] = UNTRACED_PATHS,
    ) -> None:
        self.app = app
        self.tracer = tracer or trace.get_tracer("kit.tracing")
        self.untraced_paths = frozenset(untraced_paths)
        self._spans = _lean_spans(self.tracer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self.untraced_paths:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET") if kind == "http" else "WS"
        context = _NO_PARENT  # most requests: nothing for the propagators to read
        for name, _ in scope["headers"]:
            if name in _PROPAGATED:
                context = incoming_context(scope["headers"])
                break
        spans = self._spans
        if spans is not None:
            span = spans.start(method, context)
        else:
            span = self.tracer.start_span(method, context=context, kind=SpanKind.SERVER)
        # current even when not sampled: its context, flagged unsampled, goes on
        # to the SQL and Redis calls below and to the upstream, which then drop theirs
        token = _attach_span(span)
        try:
            if not span.is_recording():
                await self.app(scope, receive, send)
                return
            status = 0

            async def recording_send(message: Message) -> None:
                nonlocal status
                message_type = message["type"]
                if message_type in ("http.response.start", "websocket.http.response.start"):
                    status = message["status"]
                elif message_type == "websocket.accept":
                    status = 101
                elif message_type == "websocket.close" and not status:
                    status = 403  # closed before accept: the server answers the upgrade with 403
                await send(message)

            try:
                await self.app(scope, receive, recording_send)
            except BaseException as error:
                if not status:
                    status = 500
                span.record_exception(error)
                raise
            finally:
                _finish(span, scope, method, status)
        finally:
            _detach(token)


def _finish(span: trace.Span, scope: Scope, method: str, status: int) -> None:
    # every attribute in one write, once the route and status are known: each
    # write takes the span's lock and checks the values again
    attributes = span_attributes(scope, "GET" if method == "WS" else method, status)
    route = attributes.get("http.route")
    if type(span) is LeanSpan and span._others is None and span._end_time is None:
        # kit's span, written by nobody else: its fields directly
        if route is not None:
            span._name = f"{method} {route}"
        span._attributes.update(attributes)
        if status >= 500 or not status:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        return
    if route is not None:
        span.update_name(f"{method} {route}")
    if isinstance(span, LeanSpan):
        span.set_own_attributes(attributes)
    else:
        span.set_attributes(attributes)
    if status >= 500 or not status:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
