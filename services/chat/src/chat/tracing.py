"""A chat message's trace, from the sender's frame to every replica's delivery.

A WebSocket session is one long server span (kit.tracing). Each message sent
on it starts a trace of its own, linked to that session span, so a busy room
is many small traces rather than one endless one:

    chat message                SERVER, on the sender's replica (link: the session)
    ├── BEGIN / INSERT / COMMIT     asyncpg, storing it
    ├── chat deliver                INTERNAL, to this replica's sockets
    └── publish chat:room           PRODUCER, its context travels in the bus payload
        ├── PUBLISH                     redis
        └── chat deliver                CONSUMER, on every other replica with sockets
                                        in the room (one per replica)

With tracing off the tracer is OpenTelemetry's no-op one and the payload
carries no trace context, byte for byte what it was before tracing existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kit.tracing import tracing_enabled

tracer = trace.get_tracer("chat")
_w3c = TraceContextTextMapPropagator()


@contextlib.contextmanager
def message_span(room: str) -> Iterator[None]:
    """A new trace for one message frame, linked to the current (session) span."""
    if not tracing_enabled():
        yield
        return
    session = trace.get_current_span().get_span_context()
    links = [Link(session)] if session.is_valid else []
    with tracer.start_as_current_span(
        "chat message",
        context=Context(),
        kind=SpanKind.SERVER,
        links=links,
        attributes={"chat.room": room},
    ):
        yield


def stored(message_id: int) -> None:
    """Names the stored message on the current span."""
    trace.get_current_span().set_attribute("messaging.message.id", str(message_id))


@contextlib.contextmanager
def publish_span(room: str, message_id: int) -> Iterator[str | None]:
    """The producer span around a publication; yields the `traceparent` to
    send along (None with tracing off or outside a trace)."""
    if not tracing_enabled() or not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    with tracer.start_as_current_span(
        "publish chat:room",
        kind=SpanKind.PRODUCER,
        attributes=_message_attributes(room, message_id) | {"messaging.operation.type": "send"},
    ):
        carrier: dict[str, str] = {}
        _w3c.inject(carrier)
        yield carrier.get("traceparent")


@contextlib.contextmanager
def deliver_span(
    room: str, message_id: int, traceparent: str | None, *, sockets: int, node: str
) -> Iterator[None]:
    """One replica handing a message to its sockets. From the bus (a
    `traceparent` given) it is a consumer span under the publication; for the
    sender's own replica a child of the current message span."""
    if not tracing_enabled():
        yield
        return
    if traceparent is not None:
        parent = _w3c.extract({"traceparent": traceparent}, context=Context())
        kind = SpanKind.CONSUMER
    elif trace.get_current_span().get_span_context().is_valid:
        parent, kind = None, SpanKind.INTERNAL
    else:
        yield  # an untraced message from an older replica
        return
    attributes = _message_attributes(room, message_id) | {
        "messaging.operation.type": "process",
        "chat.sockets": sockets,
        "chat.node": node,
    }
    with tracer.start_as_current_span(
        "chat deliver", context=parent, kind=kind, attributes=attributes
    ):
        yield


def _message_attributes(room: str, message_id: int) -> dict[str, str | int]:
    return {
        "messaging.system": "redis",
        "messaging.destination.name": "chat:room",
        "messaging.message.id": str(message_id),
        "chat.room": room,
    }
