"""kit.http: uvicorn's HTTP protocol sending a response made in one turn in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect

from kit.http import FLUSH_BYTES, CoalescingTransport, HttpProtocol
from kit.websocket import WebSocketProtocol
from kit_testing import serve


class Wire:
    """The far side of a transport: what was written, one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def write_eof(self) -> None:
        self.events.append("eof")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.1", 5000)}.get(name, default)


def coalescing(wire: Wire) -> CoalescingTransport:
    return CoalescingTransport(wire, asyncio.get_running_loop())  # type: ignore[arg-type]


async def next_turn() -> None:
    """Lets the loop run what was scheduled for its next turn."""
    await asyncio.sleep(0)


async def test_writes_of_one_turn_go_out_as_one() -> None:
    wire = Wire()
    transport = coalescing(wire)
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")
    transport.write(bytearray(b"body"))
    assert wire.writes == []
    assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
    await next_turn()
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    # a later turn's write is a write of its own
    transport.write(b"more")
    await next_turn()
    assert wire.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    assert transport.get_write_buffer_size() == 0


async def test_a_close_or_eof_sends_what_is_pending_first() -> None:
    wire = Wire()
    transport = coalescing(wire)
    transport.write(b"last words")
    transport.write_eof()
    transport.write(b"after eof")
    transport.close()
    assert wire.writes == [b"last words", b"after eof"]
    assert wire.events == ["write", "eof", "write", "close"]
    await next_turn()  # the flush scheduled for the first write finds nothing
    assert len(wire.writes) == 2


async def test_an_abort_drops_what_is_pending_and_a_closed_transport_gets_nothing() -> None:
    wire = Wire()
    transport = coalescing(wire)
    transport.write(b"never sent")
    transport.abort()
    await next_turn()
    assert wire.writes == []
    other = Wire()
    transport = coalescing(other)
    transport.write(b"too late")
    other.closing = True  # the peer went away within the turn
    await next_turn()
    assert other.writes == []


async def test_a_long_stream_within_one_turn_goes_out_in_bounded_pieces() -> None:
    wire = Wire()
    transport = coalescing(wire)
    chunk = b"x" * (FLUSH_BYTES // 4)
    for _ in range(10):
        transport.write(chunk)
    # never more than FLUSH_BYTES plus one chunk held back from the transport
    assert all(len(write) <= FLUSH_BYTES + len(chunk) for write in wire.writes)
    assert len(wire.writes) >= 2
    await next_turn()
    assert b"".join(wire.writes) == chunk * 10


async def test_everything_else_is_the_real_transports() -> None:
    wire = Wire()
    transport = coalescing(wire)
    assert transport.get_extra_info("peername") == ("10.0.0.1", 5000)
    assert transport.is_closing() is False


class CountingProtocol(HttpProtocol):
    """Counts the writes that reach the connection's real transport."""

    writes: list[bytes] = []  # noqa: RUF012

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        original = transport.write

        def write(data: Any) -> None:
            CountingProtocol.writes.append(bytes(data))
            original(data)

        transport.write = write  # type: ignore[method-assign]
        super().connection_made(transport)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """`/whole`: one response made in one turn; `/stream`: three parts, the
    loop turning between them; websockets echo once."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"]})
        await send({"type": "websocket.close", "code": 1000})
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/whole":
        body = b'{"whole":true}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"14")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"one,", b"two,"):
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b"three"})


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response's head and body (content-length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    length = int(lowered.split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def test_a_response_made_in_one_turn_is_one_write_and_streams_still_stream() -> None:
    CountingProtocol.writes = []
    async with serve(app, lifespan="off", http=CountingProtocol) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # two requests pipelined on one kept-alive connection
            writer.write(
                b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\nGET /stream HTTP/1.1\r\nhost: x\r\n\r\n"
            )
            head, body = await asyncio.wait_for(read_response(reader), 5)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert body == b'{"whole":true}'
            head, body = await asyncio.wait_for(read_response(reader), 5)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert body == b"one,two,three"
        finally:
            writer.close()
            await writer.wait_closed()
    whole, *streamed = CountingProtocol.writes
    assert whole.startswith(b"HTTP/1.1 200 OK\r\n")
    assert whole.endswith(b'\r\n\r\n{"whole":true}')
    # the stream's head went out without waiting for its body, and each part in its turn
    assert len(streamed) == 4
    assert streamed[0].endswith(b"transfer-encoding: chunked\r\n\r\n")


class RecordingSocket(WebSocketProtocol):
    """Notes the transport each socket is handed."""

    transports: list[Any] = []  # noqa: RUF012

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        RecordingSocket.transports.append(transport)
        super().connection_made(transport)


async def test_an_upgrade_hands_the_socket_the_real_transport() -> None:
    RecordingSocket.transports = []
    async with (
        serve(app, lifespan="off", http=HttpProtocol, ws=RecordingSocket) as base,
        connect(base.replace("http://", "ws://") + "/ws") as socket,
    ):
        await socket.send("hi")
        assert await socket.recv() == "hi"
    [transport] = RecordingSocket.transports
    assert not isinstance(transport, CoalescingTransport)
    assert isinstance(transport, asyncio.Transport)
