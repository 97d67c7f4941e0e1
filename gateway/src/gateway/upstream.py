"""The relay's WebSocket to a replica: websockets' sans-I/O client protocol
on a bare transport, keeping only what a relayed socket needs.

aiohttp's `ws_connect` keeps, for as long as the socket lives, the whole
upgrade: the request's headers (the client's bearer token among them), the
101 response's headers raw and parsed, its HTTP parser, a frame queue with a
deque and the connection's pool bookkeeping, about 10 KB a socket. Once the
handshake is done a relay needs the transport, a frame parser and the frames
the client has not been sent yet; `UpstreamSocket` keeps those.

The handshake is read by a parser of its own, fed only the response's head,
and dropped once it has checked the answer (status 101, `Sec-WebSocket-Accept`,
the subprotocol); the frames after it go to a second parser made open, so the
response is not kept alive by the parser's own state for the socket's life.

Flow control both ways: more than `READ_LIMIT_BYTES` of frames the relay has
not taken yet stop reading from the replica until it took them all (a limit,
not a pause after every frame: that would cost two system calls a frame); a
send waits while the transport's buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import SEND_EOF, State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from kit.websocket import Inbox

CLOSE_TIMEOUT_SECONDS = 10.0
"""How long a closing handshake may wait for the replica (aiohttp's default)."""
READ_LIMIT_BYTES = 65_536
"""Frames read from a replica and not yet relayed, at most (aiohttp's read buffer,
which the gateway used before, was as large)."""
MAX_HEAD_BYTES = 65_536
"""Longest answer head a replica may send before the gateway gives up on it."""
_HEAD_END = b"\r\n\r\n"
_ABNORMAL = 1006
# the parsers never read it: the request line and Host are the relay's own
_URI = parse_uri("ws://upstream/")


class ConnectFailed(Exception):
    """The connection to the replica never opened (refused, unreachable, timed out)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class UpgradeRefused(Exception):
    """The replica answered the upgrade with a plain HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HandshakeFailed(Exception):
    """The replica's answer was not a valid WebSocket handshake, or it went away."""


class Ended:
    """The end of the replica's side: its close frame, the connection lost
    without one (`lost`), or a frame it sent that broke the protocol (code
    1002, 1007, 1009: the close frame the relay sent it)."""

    __slots__ = ("code", "lost", "reason")

    def __init__(self, code: int, reason: str, *, lost: bool) -> None:
        self.code = code
        self.reason = reason
        self.lost = lost

    def __repr__(self) -> str:
        return f"Ended({self.code}, {self.reason!r}, lost={self.lost})"


Message = str | bytes | Ended


class UpstreamSocket(asyncio.Protocol):
    """One relayed socket's connection to its replica."""

    __slots__ = (
        "_closed",
        "_conn",
        "_drained",
        "_ended",
        "_fragments",
        "_gone",
        "_handshake",
        "_head",
        "_inbox",
        "_max_size",
        "_opened",
        "_read_limit",
        "_reading_paused",
        "_unread",
        "subprotocol",
        "transport",
    )

    def __init__(
        self, *, subprotocols: Iterable[str], max_size: int, read_limit: int = READ_LIMIT_BYTES
    ) -> None:
        offered = [Subprotocol(name) for name in subprotocols]
        # the handshake's parser: fed the response's head only, then dropped
        self._handshake: ClientProtocol | None = ClientProtocol(
            _URI, subprotocols=offered or None, max_size=max_size
        )
        self._head: bytearray | None = bytearray()
        self._conn: ClientProtocol | None = None
        self._max_size = max_size
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._inbox = Inbox()
        self._ended: Ended | None = None
        self._fragments: tuple[bool, list[bytes]] | None = None
        self._gone = False
        self._read_limit = read_limit
        self._reading_paused = False
        self._unread = 0  # bytes of messages in the inbox
        self.subprotocol: str | None = None
        self.transport: asyncio.Transport | None = None

    # -- opening ------------------------------------------------------------

    def request(self, target: bytes, headers: Iterable[tuple[str, str]], host: str) -> bytes:
        """The upgrade request: the client's headers as given (with its Host,
        else the replica's address), then the handshake's own."""
        assert self._handshake is not None
        lines = [b"GET " + target + b" HTTP/1.1"]
        has_host = False
        for name, value in headers:
            has_host = has_host or name == "host"
            lines.append(f"{name}: {value}".encode("latin-1"))
        if not has_host:
            lines.append(f"host: {host}".encode("latin-1"))
        lines += [
            b"upgrade: websocket",
            b"connection: Upgrade",
            b"sec-websocket-key: " + self._handshake.key.encode(),
            b"sec-websocket-version: 13",
        ]
        offered = self._handshake.available_subprotocols
        if offered:
            lines.append(b"sec-websocket-protocol: " + ", ".join(offered).encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    @property
    def opened(self) -> asyncio.Future[None]:
        """Done once the replica accepted the upgrade; raises UpgradeRefused
        for a plain HTTP answer, HandshakeFailed for anything else."""
        return self._opened

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._conn is not None:
            self._frame_data(data)
        elif self._head is not None:
            self._head_data(data)
        elif self._handshake is not None:
            # the body of a refusal
            self._handshake.receive_data(data)
            self._handshake_answered()

    def eof_received(self) -> bool | None:
        if self._conn is not None:
            self._conn.receive_eof()
            self._flush()
        elif self._handshake is not None:
            if self._head is not None:
                self._refuse(HandshakeFailed("the replica closed the connection"))
            else:
                self._handshake.receive_eof()  # a refusal's body read to its end
                self._handshake_answered()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if not self._opened.done():
            self._opened.set_exception(HandshakeFailed("the replica closed the connection"))
        self._handshake = self._head = None
        if self._ended is None:
            conn = self._conn
            if conn is not None and conn.close_rcvd is not None:
                self._end(conn.close_rcvd.code, conn.close_rcvd.reason, lost=False)
            elif conn is not None and conn.close_sent is not None:
                # the relay closed first (or refused a frame): not a lost replica
                self._end(conn.close_sent.code, conn.close_sent.reason, lost=False)
            else:
                self._end(_ABNORMAL, "", lost=True)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._wake_writer()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # -- the handshake --------------------------------------------------------

    def _head_data(self, data: bytes) -> None:
        head = self._head
        assert head is not None
        assert self._handshake is not None
        head += data
        end = head.find(_HEAD_END)
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                self._refuse(HandshakeFailed("the replica's answer has no end"))
            return
        end += len(_HEAD_END)
        self._head = None
        if head.startswith(b"HTTP/1.1 101 "):
            # the head alone: the frames after it go to the socket's own parser
            self._handshake.receive_data(bytes(head[:end]))
            self._handshake_answered(bytes(head[end:]))
        else:
            self._handshake.receive_data(bytes(head))
            self._handshake_answered()

    def _handshake_answered(self, rest: bytes = b"") -> None:
        handshake = self._handshake
        assert handshake is not None
        answered = any(isinstance(event, Response) for event in handshake.events_received())
        error = handshake.handshake_exc
        if not answered and error is None:
            if handshake.reader.eof:
                self._refuse(HandshakeFailed("the replica closed the connection"))
            return  # the rest of a refusal's body is on its way
        self._handshake = None
        # its parser's frame refers to it: closed, both go now rather than at
        # the collector's next pass
        handshake.parser.close()
        if isinstance(error, InvalidStatus):
            self._refuse(UpgradeRefused(error.response.status_code))
        elif error is not None:
            self._refuse(HandshakeFailed(f"invalid handshake: {error}"))
        else:
            self.subprotocol = handshake.subprotocol
            self._conn = ClientProtocol(_URI, state=State.OPEN, max_size=self._max_size)
            self._opened.set_result(None)
            if rest:
                self._frame_data(rest)

    def _refuse(self, error: Exception) -> None:
        self._handshake = self._head = None
        if not self._opened.done():
            self._opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    # -- frames ---------------------------------------------------------------

    def _frame_data(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        conn.receive_data(data)
        for event in conn.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush()  # pongs, the echo of a close frame, a close for a bad frame
        if conn.close_rcvd is not None and self._ended is None:
            self._end(conn.close_rcvd.code, conn.close_rcvd.reason, lost=False)
        elif conn.parser_exc is not None and conn.close_sent is not None and self._ended is None:
            self._end(conn.close_sent.code, conn.close_sent.reason, lost=False)

    def _frame(self, frame: Frame) -> None:
        """A message from its frames (websockets checks their order and size)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._deliver(frame.data, text=opcode is Opcode.TEXT)
            else:
                self._fragments = (opcode is Opcode.TEXT, [bytes(frame.data)])
        elif opcode is Opcode.CONT and self._fragments is not None:
            text, parts = self._fragments
            parts.append(bytes(frame.data))
            if frame.fin:
                self._fragments = None
                self._deliver(b"".join(parts), text=text)

    def _deliver(self, data: bytes | bytearray | memoryview, *, text: bool) -> None:
        message: str | bytes = bytes(data).decode() if text else bytes(data)
        self._inbox.put_nowait(message)
        self._unread += len(message)
        if self._unread > self._read_limit and not self._reading_paused and self.transport:
            # the relay is behind (its client reads slowly): read no more for now
            self._reading_paused = True
            self.transport.pause_reading()

    def _end(self, code: int, reason: str, *, lost: bool) -> None:
        self._ended = Ended(code, reason, lost=lost)
        self._inbox.put_nowait(self._ended)

    def _flush(self) -> None:
        conn, transport = self._conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        for data in conn.data_to_send():
            if data is SEND_EOF or data == b"":
                if transport.can_write_eof():
                    transport.write_eof()
            else:
                transport.write(data)

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- what the relay calls ---------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the socket is over or closing (nothing can be sent)."""
        conn = self._conn
        return conn is None or conn.state is not State.OPEN or self._ended is not None

    async def receive(self) -> Message:
        """The replica's next message, or `Ended` (again on every later call)."""
        if self._ended is not None and self._inbox.empty():
            return self._ended
        message: Message = await self._inbox.get()
        if not isinstance(message, Ended):
            self._unread -= len(message)
        if self._inbox.empty() and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    async def send_text(self, text: str) -> None:
        await self._send(text.encode(), text=True)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(data, text=False)

    async def _send(self, data: bytes, *, text: bool) -> None:
        conn = self._conn
        if conn is None or conn.state is not State.OPEN:
            raise ConnectionResetError("the upstream socket is closing")
        if text:
            conn.send_text(data)
        else:
            conn.send_binary(data)
        self._flush()
        while self._drained is not None and self._ended is None:
            await asyncio.shield(self._drained)

    async def close(self, code: int = 1000, reason: bytes | str = b"") -> None:
        """Closes with `code` unless a close is under way, then waits (at most
        CLOSE_TIMEOUT_SECONDS) for the replica to end the connection."""
        transport = self.transport
        if transport is None:
            return
        conn = self._conn
        if conn is not None and conn.state is State.OPEN:
            text = reason.decode(errors="replace") if isinstance(reason, bytes) else reason
            conn.send_close(code, text)
            self._flush()
        if self._gone:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await asyncio.shield(self._closed)
        except TimeoutError:
            transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_upstream(
    host: str,
    port: int,
    target: bytes,
    headers: Iterable[tuple[str, str]],
    *,
    subprotocols: Iterable[str],
    max_size: int,
    connect_timeout: float,
) -> UpstreamSocket:
    """Connects to `host:port` and upgrades `target` (path and query string);
    raises ConnectFailed, UpgradeRefused, HandshakeFailed or TimeoutError."""
    loop = asyncio.get_running_loop()
    socket = UpstreamSocket(subprotocols=subprotocols, max_size=max_size)
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: socket, host, port)
    except TimeoutError as error:
        socket.abort()
        raise ConnectFailed(TimeoutError(f"connecting to {host}:{port} timed out")) from error
    except OSError as error:
        raise ConnectFailed(error) from error
    assert socket.transport is not None
    try:
        socket.transport.write(socket.request(target, headers, f"{host}:{port}"))
        await socket.opened
    except BaseException:
        socket.abort()
        raise
    return socket
