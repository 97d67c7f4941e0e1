"""The edge's guards below ASGI: what a client can do to the gateway before a
request even exists, enforced on the connection itself.

uvicorn's httptools protocol reads a request's head with no deadline, keeps a
connection that never sends a byte open forever, buffers headers of any size
and lets one address open any number of connections. `EdgeHttpProtocol`
(`uvicorn --http gateway.edge:EdgeHttpProtocol`, as the image runs it) adds:

- a head deadline: the request line and headers must arrive within
  `HEADER_TIMEOUT_SECONDS` of the connection opening (or of the first byte of
  a later request on it), else 408 and the connection is closed; a connection
  that sent nothing is just closed. The clock stops while the gateway is not
  reading (pipelined requests wait for their turn); a later request's head
  late while an earlier answer is still going out is dropped unanswered, and
  the connection closes after that answer, which is neither cut nor written
  into;
- a body idle timeout: `BODY_IDLE_TIMEOUT_SECONDS` without a byte of a body
  still owed, else 408 and close (the clock stops while the gateway itself
  is not reading, i.e. while the upstream is slow to take the body);
- a head size limit, `MAX_HEADER_BYTES`, else 431 and close;
- at most `MAX_CONNECTIONS_PER_CLIENT` open connections per client address
  (HTTP and WebSocket alike; 0 turns it off); the next is answered 429 and closed;
- uvicorn's bare-text 400 for a malformed request becomes problem+json;
- a body answered before it was read whole (413) is read and dropped for at
  most `DRAIN_SECONDS`, so the client, which reads only once it has sent
  everything, gets the answer instead of a reset connection;
- at most `MAX_PIPELINED` requests waiting behind the one being answered:
  uvicorn queues every request a read holds (a read is up to 256 KiB: about
  7,000 tiny requests, and each answer resumed reading for more), so one
  connection that writes requests and reads nothing grew a worker by
  hundreds of megabytes. Reading stays paused while any wait; a request past
  the cap is not read, the queued ones are answered, and the last of them
  closes the connection (a pipelining client sends the rest again, as
  HTTP/1.1 has it do when a server closes);
- trailers (header lines after a chunked body) count against
  `MAX_HEADER_BYTES` as a head does, and are not kept (ASGI passes none on);
  uvicorn appended every one to the request's headers, with no limit;
- a refusal made after the answer has begun (a malformed or oversized rest of
  a request) closes the connection rather than writing a second answer into
  the first.

The guards cost a request that arrives whole in one read next to nothing: a
timer is set only when a read ends with a head or a body still owed (and
when the connection opens), never armed and cancelled within one read; the
head's size is summed once from what the parser kept, not per header.

A response's head goes out with the first bytes of its body, in one write
(`HeadFirst`): uvicorn writes the head as soon as the app starts the response
and the body with the next message, two system calls and two packets for
every proxied answer where one does.

A proxied request without a body starts on the gateway's direct path
(`gateway.direct`) rather than at the top of the ASGI app, when the app is
the gateway itself and not wrapped by uvicorn.

The guard reads its settings from the lifespan state (the gateway's `runtime`),
so it follows the settings the app was built with; without it (an app that
is not the gateway) the protocol is uvicorn's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from kit.addresses import limit_key
from kit.errors import PROBLEM_JSON, problem_type
from kit.websocket import WebSocketProtocol

if TYPE_CHECKING:
    from gateway.direct import DirectPath

logger = logging.getLogger("gateway.edge")

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
}
_SLUGS = {
    400: "bad-request",
    408: "request-timeout",
    429: "too-many-connections",
    431: "header-too-large",
}
MAX_PIPELINED = 32
"""Requests a connection may have waiting behind the one being answered."""
LINGER_SECONDS = 1.0
# how long the rest of a body already answered (413) is read and dropped
DRAIN_SECONDS = 5.0


def raw_problem(status: int, detail: str, *, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection,
    for refusals made before any ASGI request exists."""
    request_id = os.urandom(16).hex()
    body = json.dumps(
        {
            "type": problem_type(_SLUGS[status]),
            "title": _REASONS[status],
            "status": status,
            "detail": detail,
            "instance": request_id,
        }
    ).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"content-type: {PROBLEM_JSON}",
        f"content-length: {len(body)}",
        f"x-request-id: {request_id}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class HeadTooLarge(Exception):
    """The request head (or a body's trailers) is larger than the edge accepts."""


class TooManyPipelined(Exception):
    """More requests arrived at once than the connection may have waiting."""


class EdgeGuard:
    """Per-process edge limits and the connection count of each client address."""

    def __init__(
        self,
        *,
        header_timeout_seconds: float,
        body_idle_timeout_seconds: float,
        max_header_bytes: int,
        max_connections_per_client: int,
        on_refusal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.header_timeout_seconds = header_timeout_seconds
        self.body_idle_timeout_seconds = body_idle_timeout_seconds
        self.max_header_bytes = max_header_bytes
        self.max_connections_per_client = max_connections_per_client
        self.on_refusal = on_refusal
        self.connections: defaultdict[str, int] = defaultdict(int)

    def admit(self, address: str) -> bool:
        """Counts a new connection from `address`; False past the cap."""
        limit = self.max_connections_per_client
        if limit and self.connections[address] >= limit:
            self.refused("too_many_connections")
            return False
        self.connections[address] += 1
        return True

    def release(self, address: str) -> None:
        left = self.connections[address] - 1
        if left > 0:
            self.connections[address] = left
        else:
            self.connections.pop(address, None)

    def refused(self, reason: str) -> None:
        self.on_refusal(reason)


def _counting(ws_class: type[Any]) -> type[Any]:
    """`ws_class`, releasing its connection's slot when the socket goes."""
    cached = _COUNTING_CLASSES.get(ws_class)
    if cached is not None:
        return cached

    def connection_lost(self: Any, exc: Exception | None) -> None:
        try:
            ws_class.connection_lost(self, exc)
        finally:
            release = getattr(self, "edge_release", None)
            if release is not None:
                self.edge_release = None
                release()

    # a slot: the socket's one attribute of the edge needs no __dict__ of its own
    namespace = {"connection_lost": connection_lost, "__slots__": ("edge_release",)}
    counted = type(f"Counted{ws_class.__name__}", (ws_class,), namespace)
    _COUNTING_CLASSES[ws_class] = counted
    return counted


_COUNTING_CLASSES: dict[type[Any], type[Any]] = {}


class HeadFirst:
    """A request cycle's view of its connection's transport that holds the
    cycle's first write (the response head) until its second (the body's first
    bytes) and writes both at once, or until the loop finishes its current
    turn, whichever comes first: an answer whose body is in hand costs one
    write, and a head whose body is slow to come still goes out at once.
    Closing writes what is held first; a connection lost meanwhile takes it
    with it, as it would have taken the written head. Everything else is the
    transport's."""

    __slots__ = ("_flush", "_held", "_loop", "_started", "_transport", "on_close")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._started = False
        self._flush: asyncio.Handle | None = None
        # what closing does instead of closing at once (EdgeHttpProtocol.linger_close)
        self.on_close: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            assert self._flush is not None
            self._flush.cancel()
            self._flush = None
            self._transport.writelines((held, data))
        elif self._started:
            self._transport.write(data)
        else:
            self._started = True
            self._held = data
            self._flush = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush = None
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        if self.on_close is not None:
            self.on_close()
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        runtime = app_state.get("runtime")
        self.guard: EdgeGuard | None = getattr(runtime, "edge", None)
        # the gateway's direct path, unless uvicorn wrapped the app (gateway.direct)
        self.direct: DirectPath | None = getattr(self.app, "direct", None)
        if self.ws_protocol_class is WebSocketsSansIOProtocol:
            # uvicorn's default, as `--ws auto` picks it: kit's, which keeps less
            # per socket and logs no error for an upgrade refused with an answer
            self.ws_protocol_class = WebSocketProtocol
        if self.guard is not None and self.ws_protocol_class is not None:
            self.ws_protocol_class = _counting(self.ws_protocol_class)
        self.address: str | None = None  # set while this connection holds a slot
        self.timer: asyncio.TimerHandle | None = None
        self.head_bytes = 0  # raw bytes received while the head is still owed
        self.trailer_bytes = 0  # trailers of the current request's chunked body
        self.head_too_large = False
        self.pipeline_full = False
        self.reading_head = True
        self.first_request = True
        self.request_begun = False
        self.draining_since = 0.0
        self.refusing = False

    # -- connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        if guard is None:
            return
        # an IPv6 client counted by its /64 (kit.addresses)
        address = limit_key(self.client[0]) if self.client else ""
        if not guard.admit(address):
            self.refuse(
                429,
                f"Too many open connections from this address (at most "
                f"{guard.max_connections_per_client})",
                retry_after=1,
            )
            return
        self.address = address
        self.arm(guard.header_timeout_seconds, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.release()
        super().connection_lost(exc)

    def release(self) -> None:
        if self.address is not None and self.guard is not None:
            self.guard.release(self.address)
        self.address = None

    def data_received(self, data: bytes) -> None:
        if self.refusing:
            return  # the answer is out; what the client still sends is dropped
        guard = self.guard
        if guard is not None and self.reading_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if guard is None:
            return
        # a head still unfinished after this many bytes (one endless line, say)
        if self.reading_head and self.head_bytes > guard.max_header_bytes:
            self.head_too_large = True
            self.send_400_response("")
            return
        if (
            self.timer is None
            and self.request_begun
            and self.address is not None
            and not self.refusing
        ):
            # the read ended with part of a request still owed: its deadline
            # runs from now (a request that came whole never set a timer)
            if self.reading_head:
                self.arm(guard.header_timeout_seconds, self.head_timed_out)
            else:
                self.arm(guard.body_idle_timeout_seconds, self.body_timed_out)

    def handle_websocket_upgrade(self) -> None:
        self.disarm()
        super().handle_websocket_upgrade()
        socket_protocol = self.transport.get_protocol()
        if self.address is not None and self.guard is not None:
            # the slot now belongs to the socket, released when it closes
            guard, address = self.guard, self.address
            setattr(socket_protocol, "edge_release", lambda: guard.release(address))  # noqa: B010
            self.address = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Starts a request's task: the direct path's for a request it takes,
        the ASGI app's otherwise (uvicorn calls this for a request as it comes
        and for a pipelined one once the one before it is answered)."""
        direct = self.direct
        if direct is not None and app is self.app and direct.takes(cycle):
            task = self.loop.create_task(direct.run(cycle))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return
        super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        if self.refusing or self.transport.is_closing():
            return
        if self.pipeline_full:
            self.answer_queued_then_close()
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # the rest of a request went wrong while its answer was going out:
            # a second answer would land inside the first
            self.refusing = True
            self.transport.close()
            return
        if self.head_too_large and self.guard is not None:
            self.guard.refused("header_too_large")
            self.refuse(431, f"The request head exceeds {self.guard.max_header_bytes} bytes")
            return
        self.transport.write(raw_problem(400, msg))
        self.transport.close()

    # -- the request's head and body --------------------------------------------

    def answer_queued_then_close(self) -> None:
        """Reads nothing more; the requests already queued are answered, and
        the last of them closes the connection."""
        self.refusing = True  # what the client still sends is dropped
        self.flow.pause_reading()
        newest = self.pipeline[0][0] if self.pipeline else self.cycle
        # each request cycle writes through its own HeadFirst (on_headers_complete)
        writer: object = None if newest is None else newest.transport
        if newest is not None and not newest.response_complete and isinstance(writer, HeadFirst):
            # closes once answered (saying `connection: close` if its head is
            # still to go)...
            newest.keep_alive = False
            writer.on_close = self.linger_close  # ...without a reset
        else:
            self.linger_close()

    def linger_close(self) -> None:
        """Closes the connection without resetting it: the answer's end is
        sent (FIN), what the client still sends is read and dropped for
        `LINGER_SECONDS`, then it closes. Closed with requests unread in its
        buffer, a connection is reset, and the client may lose the answers
        it has not read yet."""
        self.refusing = True
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_SECONDS, transport.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline:
            # uvicorn resumes reading after every answer, though requests still
            # wait: the next read would queue more behind them
            self.flow.pause_reading()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.trailer_bytes = 0
        self.request_begun = True
        if self.first_request:
            self.first_request = False  # its deadline runs from the connection's start
        else:
            # a later request on a kept-alive connection: its own deadline, set
            # by data_received if the head is still owed when the read ends
            self.head_bytes = 0

    def head_size(self) -> int:
        """The head as parsed: the target and each header with its `: ` and CRLF
        (uvicorn keeps both for the request; summed once, not per header)."""
        size = len(self.url)
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reading_head:
            super().on_header(name, value)
            return
        # a trailer, after a chunked body: never passed on, only counted
        guard = self.guard
        self.trailer_bytes += len(name) + len(value) + 4
        if guard is not None and self.trailer_bytes > guard.max_header_bytes:
            self.head_too_large = True
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        guard = self.guard
        if guard is not None and self.head_size() > guard.max_header_bytes:
            # raised through the parser: uvicorn answers with send_400_response
            self.head_too_large = True
            raise HeadTooLarge
        if guard is not None and len(self.pipeline) >= MAX_PIPELINED:
            # raised through the parser, which stops reading this read's rest
            self.pipeline_full = True
            guard.refused("too_many_pipelined")
            raise TooManyPipelined
        self.reading_head = False
        # the head's deadline is met; a body still owed at the end of this read
        # gets its idle timer from data_received
        self.disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request, not an upgrade
            cycle.transport = HeadFirst(self.transport, self.loop)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.cycle is not None and self.cycle.response_complete:
            # answered early (a 413, say): the rest is read and dropped, so the
            # client can finish sending and read the answer, but not for ever
            now = self.loop.time()
            self.draining_since = self.draining_since or now
            if now - self.draining_since > DRAIN_SECONDS:
                self.transport.close()
                return
        if self.guard is not None and self.timer is not None:
            self.arm(self.guard.body_idle_timeout_seconds, self.body_timed_out)

    def on_message_complete(self) -> None:
        self.disarm()
        self.draining_since = 0.0
        self.request_begun = False
        self.reading_head = True
        self.head_bytes = 0
        super().on_message_complete()

    # -- timers -------------------------------------------------------------------

    def arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.disarm()
        self.timer = self.loop.call_later(seconds, callback)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def head_timed_out(self) -> None:
        self.timer = None
        guard = self.guard
        if self.transport.is_closing() or guard is None:
            return
        if self.flow.read_paused:
            # the gateway is not reading (requests before this one wait for
            # their answers): the client is not the one late
            self.arm(guard.header_timeout_seconds, self.head_timed_out)
            return
        guard.refused("header_timeout")
        if self.answer_owed():
            # an earlier request's answer is still going out: it is finished,
            # not cut, and not written into; this request is dropped, and the
            # connection closes after that answer
            self.answer_queued_then_close()
        elif self.request_begun or self.head_bytes:
            self.refuse(408, "The request head did not arrive in time")
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def answer_owed(self) -> bool:
        """Whether a request read before this point still waits for (or is
        getting) its answer."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def body_timed_out(self) -> None:
        self.timer = None
        guard = self.guard
        if self.transport.is_closing() or guard is None:
            return
        if self.flow.read_paused:
            # the gateway is not reading (its upstream is slow to take the
            # body): the client is not the one idle
            self.arm(guard.body_idle_timeout_seconds, self.body_timed_out)
            return
        guard.refused("body_timeout")
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            self.refuse(408, "The request body stopped arriving")

    def refuse(self, status: int, detail: str, *, retry_after: int | None = None) -> None:
        """Answers before (or instead of) the application and closes, after a
        short linger so the client can read the answer before the close."""
        self.disarm()
        self.refusing = True
        if self.cycle is not None and not self.cycle.response_complete:
            # to the application the client is gone: it writes nothing after this
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(raw_problem(status, detail, retry_after=retry_after))
        self.linger_close()
