"""The relay's WebSocket to a replica, keeping only what a relayed socket needs.

aiohttp's `ws_connect` keeps, for as long as the socket lives, the whole
upgrade: the request's headers (the client's bearer token among them), the
101 response's headers raw and parsed, its HTTP parser, a frame queue with a
deque and the connection's pool bookkeeping, about 10 KB a socket. Once the
handshake is done a relay needs the transport, the bytes of a frame not yet
whole and the messages the client has not been sent yet; `UpstreamSocket`
keeps those.

The handshake is websockets' sans-I/O client protocol, fed only the answer's
head and dropped once it has checked it (status 101, `Sec-WebSocket-Accept`,
the subprotocol). The frames after it are read here: a replica's frames are
few kinds (text, binary, continuation, ping, pong, close) and arrive whole
in one read nearly always, and websockets' generator-based parser cost about
4 us a frame against about 1 us for this loop, at every delivery to every
socket. The rules are RFC 6455's: a replica's frames are not masked and set
no reserved bit (no extension is negotiated), control frames are whole and
at most 125 bytes, text is UTF-8, a message is at most `max_size` bytes; a
frame that breaks one is answered with a close frame (1002, 1007, 1009) and
ends the socket. Frames sent are masked and built by websockets.

A whole text or binary frame is passed to the client as it came, when
nothing is waiting before it: a replica's frame and the gateway's frame to
its client are the same bytes (neither is masked, neither compressed), so
`forward` (the client socket's `kit.websocket` frame writer) writes it to the
client's transport from here, with no task woken and nothing framed again.
Anything else (fragments, a client transport that is paused, messages the
relay has not sent yet) goes through the inbox and the relay, in order.

Flow control both ways: more than `READ_LIMIT_BYTES` of messages the relay
has not taken yet stop reading from the replica until it took them all (a
limit, not a pause after every message: that would cost two system calls a
message); a send waits while the transport's buffer is above its high-water
mark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, ProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from kit.websocket import Inbox, WebSocketProtocol

CLOSE_TIMEOUT_SECONDS = 10.0
"""How long a closing handshake may wait for the replica (aiohttp's default)."""
READ_LIMIT_BYTES = 65_536
"""Messages read from a replica and not yet relayed, at most (aiohttp's read
buffer, which the gateway used before, was as large)."""
MAX_HEAD_BYTES = 65_536
"""Longest answer head a replica may send before the gateway gives up on it."""
_HEAD_END = b"\r\n\r\n"
_ABNORMAL = 1006
_STALLED = 1011  # the replica read nothing of what the relay wrote for too long
_PROTOCOL_ERROR = 1002
_INVALID_DATA = 1007
_MESSAGE_TOO_BIG = 1009
_TEXT, _BINARY, _CONTINUATION = 0x1, 0x2, 0x0
_CLOSE, _PING, _PONG = 0x8, 0x9, 0xA
_TEXT_WHOLE, _BINARY_WHOLE = 0x80 | _TEXT, 0x80 | _BINARY
_WHOLE_DATA = frozenset((_TEXT_WHOLE, _BINARY_WHOLE))
# the handshake's parser never reads it: the request line and Host are the relay's own
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
    without one (`lost`), or a frame it sent that broke the protocol (the close
    frame the relay answered it with: 1002, 1007, 1009)."""

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
        "_drained",
        "_ended",
        "_fragments",
        "_gone",
        "_handshake",
        "_head",
        "_inbox",
        "_max_size",
        "_open",
        "_opened",
        "_owed",
        "_pending",
        "_read_limit",
        "_reading_paused",
        "_sent_close",
        "_unread",
        "_was_behind",
        "_write_stall_seconds",
        "forward",
        "subprotocol",
        "transport",
    )

    def __init__(
        self,
        *,
        subprotocols: Iterable[str],
        max_size: int,
        read_limit: int = READ_LIMIT_BYTES,
        write_stall_seconds: float = 30.0,
    ) -> None:
        offered = [Subprotocol(name) for name in subprotocols]
        # the handshake's parser: fed the answer's head only, then dropped
        self._handshake: ClientProtocol | None = ClientProtocol(
            _URI, subprotocols=offered or None, max_size=max_size
        )
        self._head: bytearray | None = bytearray()
        self._open = False  # the handshake is done and no close frame went out
        self._max_size = max_size
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._inbox = Inbox()
        self._ended: Ended | None = None
        self._pending: bytearray | None = None  # a frame not yet whole
        self._fragments: tuple[bool, list[bytes]] | None = None  # a message not yet whole
        self._sent_close: Close | None = None
        self._gone = False
        self._read_limit = read_limit
        self._reading_paused = False
        # the relay fell behind this socket once (its client read slowly): a
        # loss then may be the replica dropping a slow consumer, not dying
        self._was_behind = False
        self._unread = 0  # bytes of the messages in the inbox
        self._owed = 0  # messages handed to the relay and not yet sent by it
        # how long a write may wait for the replica to read before the
        # connection is given up (a replica that dropped the socket and
        # reads no more); the relay then ends, whatever the client does
        self._write_stall_seconds = write_stall_seconds
        self.forward: WebSocketProtocol | None = None
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
        if self._handshake is None:
            self._frames(data)
        elif self._head is not None:
            self._head_data(data)
        else:
            # the body of a refusal
            self._handshake.receive_data(data)
            self._handshake_answered()

    def eof_received(self) -> bool | None:
        if self._handshake is not None:
            if self._head is not None:
                self._refuse(HandshakeFailed("the replica closed the connection"))
            else:
                self._handshake.receive_eof()  # a refusal's body read to its end
                self._handshake_answered()
        return None  # the transport closes itself; connection_lost tells how it ended

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._open = False
        if not self._opened.done():
            self._opened.set_exception(HandshakeFailed("the replica closed the connection"))
        self._handshake = self._head = None
        self._pending = None
        if self._ended is None:
            sent = self._sent_close
            if sent is not None:
                # the relay closed first, and the replica hung up before answering
                self._end(sent.code, sent.reason, lost=False)
            else:
                # after the relay fell behind, the replica may have dropped its
                # slow consumer, the close frame stuck behind what the gateway
                # did not read: not counted against a replica any client could
                # have ejected that way (its other sockets tell if it died)
                self._end(_ABNORMAL, "", lost=not self._was_behind)
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
        handshake = self._handshake
        assert head is not None
        assert handshake is not None
        head += data
        end = head.find(_HEAD_END)
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                self._refuse(HandshakeFailed("the replica's answer has no end"))
            return
        end += len(_HEAD_END)
        self._head = None
        if head.startswith(b"HTTP/1.1 101 "):
            # the head alone: the frames after it are this socket's own
            handshake.receive_data(bytes(head[:end]))
            self._handshake_answered(bytes(head[end:]))
        else:
            handshake.receive_data(bytes(head))
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
        if isinstance(error, InvalidStatus) and 100 <= error.response.status_code <= 599:
            self._refuse(UpgradeRefused(error.response.status_code))
        elif error is not None:
            self._refuse(HandshakeFailed(f"invalid handshake: {error}"))
        else:
            self.subprotocol = handshake.subprotocol
            self._open = True
            self._opened.set_result(None)
            if rest:
                self._frames(rest)

    def _refuse(self, error: Exception) -> None:
        self._handshake = self._head = None
        if not self._opened.done():
            self._opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    # -- frames ---------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        """Reads every whole frame in what has arrived; keeps the rest."""
        if self._ended is not None:
            return  # after a close frame (or a broken one) nothing more is read
        pending = self._pending
        if pending is not None:
            pending += data
            buffer: bytes | bytearray = pending
        else:
            buffer = data
        size = len(buffer)
        at = 0
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length, start = second & 0x7F, at + 2
            if length == 126:
                if size - at < 4:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 4], "big"), at + 4
            elif length == 127:
                if size - at < 10:
                    break
                length, start = int.from_bytes(buffer[at + 2 : at + 10], "big"), at + 10
            if second & 0x80 or first & 0x70:
                self._fail(_PROTOCOL_ERROR, "a masked frame or a reserved bit from the server")
                return
            if length > self._max_size:
                self._fail(_MESSAGE_TOO_BIG, f"a frame of {length} bytes")
                return
            end = start + length
            if end > size:
                break
            if (
                first in _WHOLE_DATA
                and self.forward is not None
                and self._owed == 0
                and self._fragments is None
                and self._inbox.empty()
                and self._sent_close is None
                and self._forwarded(first, buffer, at, start, end)
            ):
                at = end
                continue
            self._frame(first, bytes(buffer[start:end]))
            at = end
            if self.ended:
                return  # a close frame, or one that broke the protocol
        if at == size:
            self._pending = None
        elif pending is not None:
            del pending[:at]
        else:
            self._pending = bytearray(buffer[at:])

    def _forwarded(
        self, first: int, buffer: bytes | bytearray, at: int, start: int, end: int
    ) -> bool:
        """Writes a whole data frame to the client as it came; False if the
        client's socket cannot take it now (or its text is not UTF-8)."""
        assert self.forward is not None
        if first == _TEXT_WHOLE:
            try:
                bytes(buffer[start:end]).decode()
            except UnicodeDecodeError:
                return False  # read the usual way, which closes with 1007
        return self.forward.write_frame(bytes(buffer[at:end]))

    def _frame(self, first: int, payload: bytes) -> None:
        fin, opcode = first & 0x80, first & 0x0F
        if opcode in (_TEXT, _BINARY):
            if self._fragments is not None:
                self._fail(_PROTOCOL_ERROR, "a new message inside a fragmented one")
            elif fin:
                self._deliver(payload, text=opcode == _TEXT)
            else:
                self._fragments = (opcode == _TEXT, [payload])
        elif opcode == _CONTINUATION:
            if self._fragments is None:
                self._fail(_PROTOCOL_ERROR, "a continuation of no message")
                return
            text, parts = self._fragments
            parts.append(payload)
            if sum(len(part) for part in parts) > self._max_size:
                self._fail(_MESSAGE_TOO_BIG, "a fragmented message above the limit")
            elif fin:
                self._fragments = None
                self._deliver(b"".join(parts), text=text)
        elif opcode in (_CLOSE, _PING, _PONG):
            if not fin or len(payload) > 125:
                self._fail(_PROTOCOL_ERROR, "a fragmented or long control frame")
            elif opcode == _PING:
                if self._open:
                    self._write(Opcode.PONG, payload)
            elif opcode == _CLOSE:
                self._closed_by_replica(payload)
        else:
            self._fail(_PROTOCOL_ERROR, f"an unknown opcode {opcode}")

    def _deliver(self, data: bytes, *, text: bool) -> None:
        if self._sent_close is not None:
            return  # the relay is closing: its client is gone
        if text:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError:
                self._fail(_INVALID_DATA, "text that is not UTF-8")
                return
        else:
            message = data
        self._inbox.put_nowait(message)
        self._unread += len(message)
        if self._unread > self._read_limit and not self._reading_paused and self.transport:
            # the relay is behind (its client reads slowly): read no more for now
            self._reading_paused = self._was_behind = True
            self.transport.pause_reading()

    def _closed_by_replica(self, payload: bytes) -> None:
        try:
            close = Close.parse(payload)  # no payload: 1005, no status
        except (ProtocolError, UnicodeDecodeError):
            self._fail(_PROTOCOL_ERROR, "an invalid close frame")
            return
        if self._open:
            # echoed as it came; the replica then ends the connection
            self._open = False
            self._write(Opcode.CLOSE, payload)
        self._end(close.code, close.reason, lost=False)

    def _fail(self, code: int, reason: str) -> None:
        """The replica broke the protocol: a close frame tells it why, and the
        socket ends with that code."""
        self._send_close(code, reason)
        self._pending = None
        self._end(code, reason, lost=False)

    def _end(self, code: int, reason: str, *, lost: bool) -> None:
        self._ended = Ended(code, reason, lost=lost)
        self._inbox.put_nowait(self._ended)

    def _send_close(self, code: int, reason: str) -> None:
        if self._open:
            self._open = False
            self._sent_close = Close(code, reason)
            self._write(Opcode.CLOSE, self._sent_close.serialize())

    def _write(self, opcode: Opcode, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(Frame(opcode, data).serialize(mask=True))

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- what the relay calls ---------------------------------------------------

    @property
    def ended(self) -> bool:
        """Whether the replica's side is over (its close frame, a broken frame, gone)."""
        return self._ended is not None

    @property
    def closed(self) -> bool:
        """Whether the socket is over or closing (nothing can be sent)."""
        return not self._open or self._ended is not None

    async def receive(self) -> Message:
        """The replica's next message, or `Ended` (again on every later call)."""
        if self._ended is not None and self._inbox.empty():
            return self._ended
        message: Message = await self._inbox.get()
        if not isinstance(message, Ended):
            self._unread -= len(message)
            self._owed += 1
        if self._inbox.empty() and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    def relayed(self) -> None:
        """The relay sent (or gave up on) the message `receive` gave it last."""
        self._owed -= 1

    async def send_text(self, text: str) -> None:
        await self._send(Opcode.TEXT, text.encode())

    async def send_bytes(self, data: bytes) -> None:
        await self._send(Opcode.BINARY, data)

    async def _send(self, opcode: Opcode, data: bytes) -> None:
        if not self._open:
            raise ConnectionResetError("the upstream socket is closing")
        self._write(opcode, data)
        while self._drained is not None and not self._gone:
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), self._write_stall_seconds)
            except TimeoutError:
                # not a lost replica (it answers others): this socket is over
                if self._ended is None:
                    self._end(_STALLED, "the replica stopped reading", lost=False)
                self.abort()
                raise ConnectionResetError("the replica stopped reading") from None

    async def close(self, code: int = 1000, reason: bytes | str = b"") -> None:
        """Closes with `code` unless a close is under way, then waits (at most
        CLOSE_TIMEOUT_SECONDS) for the replica to end the connection."""
        if self.transport is None or self._gone:
            return
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else reason
        self._send_close(code, text)
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    protocol: asyncio.Protocol,
    host: str,
    port: int,
    connect_timeout: float,
    *,
    abandon: Callable[[], None],
) -> None:
    """Opens a TCP connection to a replica for `protocol`; raises ConnectFailed
    (refused, unreachable or timed out: nothing was sent). `abandon` drops a
    connection that opened only after the timeout fired."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: protocol, host, port)
    except TimeoutError as error:
        abandon()
        raise ConnectFailed(TimeoutError(f"connecting to {host}:{port} timed out")) from error
    except OSError as error:
        raise ConnectFailed(error) from error


async def open_upstream(
    host: str,
    port: int,
    target: bytes,
    headers: Iterable[tuple[str, str]],
    *,
    subprotocols: Iterable[str],
    max_size: int,
    connect_timeout: float,
    write_stall_seconds: float = 30.0,
) -> UpstreamSocket:
    """Connects to `host:port` and upgrades `target` (path and query string);
    raises ConnectFailed, UpgradeRefused, HandshakeFailed or TimeoutError."""
    socket = UpstreamSocket(
        subprotocols=subprotocols, max_size=max_size, write_stall_seconds=write_stall_seconds
    )
    await connect(socket, host, port, connect_timeout, abandon=socket.abort)
    assert socket.transport is not None
    try:
        socket.transport.write(socket.request(target, headers, f"{host}:{port}"))
        await socket.opened
    except BaseException:
        socket.abort()
        raise
    return socket
