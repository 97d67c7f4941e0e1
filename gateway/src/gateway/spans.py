"""The client span of a request the gateway sends to a replica (a proxied
request, a WebSocket upgrade): with tracing on, its context goes upstream in
`traceparent`, so the replica's server span continues the client's trace.
With tracing off it is one shared object that does nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Self

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.pool import Replica
from kit.tracing import tracing_enabled

_tracer = trace.get_tracer("gateway.upstream")


class ClientSpan:
    """Entered around the exchange; `carried` are the headers that carry its
    context upstream (none with tracing off)."""

    __slots__ = ("_scope", "carried", "span")

    def __init__(
        self,
        span: trace.Span | None = None,
        scope: AbstractContextManager[trace.Span] | None = None,
        carried: list[tuple[str, str]] | None = None,
    ) -> None:
        self.span = span
        self._scope = scope
        self.carried = carried or []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        span = self.span
        if span is None:
            return
        if self._scope is not None:
            self._scope.__exit__(kind, error, traceback)  # no longer the current span
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    def answered(self, status: int) -> None:
        """The replica's status; 4xx and 5xx mark a client span as failed
        (the HTTP semantic conventions' rule for client spans)."""
        span = self.span
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_status(Status(StatusCode.ERROR))


_OFF = ClientSpan()


def client_span(method: str, replica: Replica, target: bytes) -> ClientSpan:
    """A CLIENT span named by the method, as OpenTelemetry's HTTP clients name
    theirs, made current while the request is sent."""
    if not tracing_enabled():
        return _OFF
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.full": f"http://{replica.address}:{replica.port}{target.decode('latin-1')}",
        "server.address": replica.address,
        "server.port": replica.port,
    }
    span = _tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
    # the exception, if any, is recorded once, by ClientSpan
    scope = trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )
    scope.__enter__()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return ClientSpan(span, scope, list(carrier.items()))


def with_trace_context(
    headers: list[tuple[str, str]], carried: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The client's headers, with the span's trace context in place of the
    client's own (`traceparent`, `tracestate`) when tracing is on."""
    if not carried:
        return headers
    replaced = {name for name, _ in carried}
    return [(name, value) for name, value in headers if name not in replaced] + carried
