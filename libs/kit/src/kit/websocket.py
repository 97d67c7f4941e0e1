"""uvicorn's WebSocket protocol, keeping less for each socket it holds.

uvicorn's `websockets-sansio` protocol (the one `--ws auto` picks) keeps, for
as long as a socket lives:

- the handshake's request, as websockets parsed it (every header as a name, a
  lower-cased name and a value, in a dict and a list: 4-5 KB with a bearer
  token among them), twice over: as an attribute, and in the frame of the
  parser generator that read it and then reads every frame after it;
- the handshake's response;
- an `asyncio.Queue` for the events the app has not received: four deques
  (its getters, putters and items, and its `Event`'s waiters) of about 600
  bytes each, even while empty;
- an `asyncio.Event` for the transport's write flow control: one deque more.

`WebSocketProtocol` is that protocol with the handshake let go once it is
answered (the frames get a parser of their own) and with an inbox and a write
gate that allocate only while something is in them or waits on them, and that
keeps uvicorn's attributes in slots: 12-13 KB less per socket, measured in a
chat replica and a gateway worker holding 2,000 sockets each.
Everything else is uvicorn's own, so it speaks and closes exactly as uvicorn
does: pings, the size limit, flow control, 1012 on shutdown. Run it with
`uvicorn --ws kit.websocket:WebSocketProtocol` (or
`UVICORN_WS=kit.websocket:WebSocketProtocol`); every image does.

The headers the app reads stay in `scope["headers"]`, which the app owns;
`release_headers` lets an app that is done with them let them go.

A frame sent the ASGI way passes every layer's `send` wrapper, uvicorn's
checks and websockets' framing, for each socket it goes to. A server frame
is the same bytes whoever receives it (servers do not mask), so an app that
sends one message to many sockets (a chat room, a relay) frames it once
(`text_frame`) and writes it to each socket's transport (`frames_of(scope)`
then `write_frame`), falling back to `send` whenever the socket cannot take
it at once (its transport is paused, or it is closing).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import os
import re
from typing import Any

from starlette.types import Scope
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from kit.errors import PROBLEM_JSON, problem_type

FRAMES_EXTENSION = "kit.websocket.frames"
"""The scope extension under which the socket's protocol takes encoded frames."""
_TEXT_FIN = 0x81
_BINARY_FIN = 0x82


def _frame(first: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big") + payload
    return bytes((first, 127)) + length.to_bytes(8, "big") + payload


def text_frame(text: str) -> bytes:
    """`text` as one unmasked, unfragmented text frame: what a server sends."""
    return _frame(_TEXT_FIN, text.encode())


def binary_frame(data: bytes) -> bytes:
    """`data` as one unmasked, unfragmented binary frame."""
    return _frame(_BINARY_FIN, data)


def _park(
    waiters: list[asyncio.Future[None]] | None,
) -> tuple[list[asyncio.Future[None]], asyncio.Future[None]]:
    """A new future to wait on, added to `waiters` (a list made on first use)."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if waiters is None:
        return [waiter], waiter
    waiters.append(waiter)
    return waiters, waiter


class Inbox:
    """The events the app has not received yet: the part of `asyncio.Queue`
    uvicorn uses (`put_nowait`, `get`, `empty`), holding no container while
    empty and a future only while a reader waits."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        self._wake_one()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> Any:
        while not self._items:
            self._waiters, waiter = _park(self._waiters)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                self._forget(waiter)
                if self._items and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the next reader takes it
                raise
            self._forget(waiter)
        items = self._items
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                self._waiters = None

    def _wake_one(self) -> None:
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
                return


class WriteGate:
    """Open while the transport takes writes: the part of `asyncio.Event` uvicorn
    uses for flow control (`set`, `clear`, `is_set`, `wait`), holding a future
    only while a writer waits for the transport to drain."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        self._waiters, waiter = _park(self._waiters)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
                if not self._waiters:
                    self._waiters = None
        return True


_INVALID_HEADER = re.compile(r"invalid ([A-Za-z-]+) header")


class ProblemRefusals(ServerProtocol):
    """websockets' server side of the handshake, refusing one it cannot take
    (no or a bad key, another version, a malformed subprotocol list) with a
    problem+json answer, the one error format, rather than plain text that
    quotes the offending header back. The header is named, not quoted."""

    def reject(self, status: http.HTTPStatus | int, text: str) -> Response:
        status = http.HTTPStatus(status)
        request_id = os.urandom(16).hex()
        named = _INVALID_HEADER.search(text)
        detail = "Not a valid WebSocket handshake" + (
            f": its {named.group(1)} header" if named else ""
        )
        body = json.dumps(
            {
                "type": problem_type(status.phrase.lower().replace(" ", "-")),
                "title": status.phrase,
                "status": status.value,
                "detail": detail,
                "instance": request_id,
            }
        ).encode()
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", PROBLEM_JSON),
                ("X-Request-ID", request_id),
            ]
        )
        return Response(status.value, status.phrase, headers, body)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with less kept per socket (above)."""

    # uvicorn's attributes, in slots: more than 30 of them would otherwise make
    # each socket's __dict__ a table of its own (1.5 KB) rather than values
    # beside keys shared by the class. A name uvicorn adds later still works,
    # in a __dict__.
    __slots__ = (
        "app",
        "app_state",
        "asgi_version",
        "client",
        "close_sent",
        "close_timeout",
        "close_timer",
        "config",
        "conn",
        "connections",
        "curr_msg_data_type",
        "default_headers",
        "disconnected",
        "frames",
        "handshake_complete",
        "handshake_initiated",
        "initial_response",
        "last_ping_rtt",
        "logger",
        "loop",
        "pending_ping_payload",
        "ping_interval",
        "ping_sent_at",
        "ping_timeout",
        "ping_timer",
        "pong_timer",
        "queue",
        "read_paused",
        "request",
        "response",
        "root_path",
        "scheme",
        "scope",
        "server",
        "tasks",
        "transport",
        "writable",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the handshake's refusals as problem+json: the class, not a method put
        # on each instance, so a socket keeps nothing more for it
        self.conn.__class__ = ProblemRefusals
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = WriteGate()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code != 101:
            # websockets refused the upgrade itself (no or a bad key, another
            # version): uvicorn answered it and closed, with no scope made. An
            # error here would leave the protocol in the server's books for
            # good (uvicorn hands it the transport only after this returns).
            self.request = None  # type: ignore[assignment]
            return
        extensions = self.scope.get("extensions")
        if extensions is not None:
            # the protocol itself rather than a dict of its own (ASGI's custom):
            # nothing more kept per socket
            extensions[FRAMES_EXTENSION] = self  # type: ignore[assignment]
        # the scope holds what the app reads of the request; the parsed request
        # itself is never read again
        self.request = None  # type: ignore[assignment]
        conn = self.conn
        if conn.state is State.CONNECTING and not conn.reader.buffer:
            # websockets' server parser reads the request, then frames for the
            # socket's whole life in the same generator, whose frame keeps the
            # request alive; a frame parser of its own lets it go. Nothing of a
            # frame has been read yet (a client sends none before the answer),
            # so nothing is lost; a buffer not empty keeps the parser it has.
            conn.parser = Protocol.parse(conn)
            next(conn.parser)

    def keepalive_timeout(self) -> None:
        """uvicorn writes 1011 and closes the transport; a close waits for what
        the transport holds to reach the peer, and a peer that stopped reading
        (often why it stopped answering pings) never takes it: the socket,
        and whatever serves it (a relay, a room's membership), were held for
        good. The connection is cut once the close frame is written."""
        super().keepalive_timeout()
        self._cut_unless_drained()

    def _close_or_cut(self) -> None:
        """The close handshake's time ran out (the peer did not answer the
        app's close frame): as uvicorn's timer, but cut when the peer reads
        nothing, which a close would wait on for good."""
        self.transport.close()
        self._cut_unless_drained()

    def shutdown(self) -> None:
        """The server stops: uvicorn closes with 1012 (or ends the close under
        way), and a close waits for the peer to read; one that reads nothing
        held the server's stop for good. The connection is cut if it has not
        drained within the close handshake's time."""
        super().shutdown()
        self.loop.call_later(self.close_timeout, self._cut_unless_drained)

    def _cut_unless_drained(self) -> None:
        if self.transport.get_write_buffer_size() > 0:
            self.transport.abort()

    async def send(self, message: ASGISendEvent) -> None:
        if (
            message["type"] == "websocket.close"
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and not self.writable.is_set()
            and not self.transport.is_closing()
        ):
            # the peer reads nothing (the transport is paused): uvicorn's close
            # would wait for it to read before writing the close frame, for good.
            # The frame goes behind what it has not read, as uvicorn writes it,
            # and the close handshake's time runs out as for any close
            code, reason = message.get("code", 1000), message.get("reason", "") or ""
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_cut)
            return
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_cut)
        if message["type"] == "websocket.http.response.body" and not message.get(
            "more_body", False
        ):
            # an upgrade refused with an HTTP answer (the denial-response
            # extension: a 401 or a 503 as problem+json) is a finished
            # handshake; uvicorn leaves it unfinished in its books and logs
            # "ASGI callable returned without completing handshake." at ERROR
            # for every one, a thousand lines in a reconnect storm
            self.handshake_complete = True
        if self.handshake_complete:
            # answered (accepted, refused or an HTTP response): never read again
            self.response = None  # type: ignore[assignment]

    def handle_ping(self) -> None:
        super().handle_ping()  # the pong, written at once
        if not self.writable.is_set() and not self.read_paused:
            # a client that sends pings and reads none of the pongs: they would
            # pile up in the write buffer, a byte kept for each byte it sends.
            # Nothing more is read until it reads them (resume_writing)
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.read_paused and self.queue.empty():  # as uvicorn's receive() resumes
            self.read_paused = False
            self.transport.resume_reading()

    def write_frame(self, frame: bytes) -> bool:
        """Writes an encoded frame (`text_frame`, `binary_frame`) to the client
        now; False, writing nothing, when the socket cannot take it at once: not
        open yet or any more, closing, or its transport paused (the caller then
        sends the ASGI way, which waits for the transport or raises)."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.initial_response is not None
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(frame)
        return True


def frames_of(scope: Scope) -> WebSocketProtocol | None:
    """The protocol that takes encoded frames for this socket, if its server
    runs `WebSocketProtocol`."""
    extensions = scope.get("extensions")
    return None if extensions is None else extensions.get(FRAMES_EXTENSION)


def release_headers(scope: Scope) -> None:
    """Lets the handshake's request headers go once the app is done with them:
    an open socket holds its scope for its whole life, and with it every header
    (a bearer token, forwarded addresses: 1-2 KB). The list is emptied in place,
    so every layer holding it (a Starlette `Headers`, say) sees it empty."""
    headers = scope.get("headers")
    if isinstance(headers, list):
        headers.clear()
