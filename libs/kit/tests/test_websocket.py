"""kit.websocket: uvicorn's protocol keeping less per socket, still speaking as uvicorn does."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time
import weakref
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from kit.websocket import (
    Inbox,
    WebSocketProtocol,
    WriteGate,
    binary_frame,
    frames_of,
    release_headers,
    text_frame,
)
from kit_testing import serve, websocket_upgrade

TIMEOUT = 5.0


class Recorder(WebSocketProtocol):
    """Keeps a weak reference to each handshake's request and response."""

    handshakes: list[tuple[weakref.ref[Request], weakref.ref[Response]]] = []  # noqa: RUF012

    def handle_connect(self, event: Any) -> None:
        request = weakref.ref(event)
        super().handle_connect(event)
        # the response is made in handle_connect and sent on accept
        response = weakref.ref(self.response) if self.response is not None else None
        assert response is not None
        Recorder.handshakes.append((request, response))


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Echoes frames; `close:<code>` closes with that code; `headers` tells how
    many request headers the scope still holds after `release_headers`."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept", "subprotocol": None})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        elif text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text[6:]), "reason": "bye"})
            return
        elif text == "headers":
            before = len(scope["headers"])
            release_headers(scope)
            await send({"type": "websocket.send", "text": f"{before}->{len(scope['headers'])}"})
        else:
            await send({"type": "websocket.send", "text": text})


async def test_frames_go_both_ways_and_close_codes_pass() -> None:
    async with serve(echo, lifespan="off", ws=WebSocketProtocol) as base:
        url = base.replace("http://", "ws://") + "/ws"
        async with connect(url) as socket:
            await socket.send("hello")
            assert await socket.recv() == "hello"
            await socket.send(b"\x00\x01")
            assert await socket.recv() == b"\x00\x01"
            # more than one frame waiting at once
            for number in range(20):
                await socket.send(str(number))
            assert [await socket.recv() for _ in range(20)] == [str(n) for n in range(20)]
            await socket.send("close:4001")
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")


async def test_the_handshake_is_not_kept_once_the_socket_is_open() -> None:
    Recorder.handshakes.clear()
    async with serve(echo, lifespan="off", ws=Recorder) as base:
        url = base.replace("http://", "ws://") + "/ws"
        async with connect(url, additional_headers={"Authorization": "Bearer x" * 100}) as socket:
            await socket.send("still here")
            assert await socket.recv() == "still here"
            gc.collect()
            ((request, response),) = Recorder.handshakes
            assert request() is None
            assert response() is None
            await socket.send("headers")
            released = await socket.recv()
        before, after = str(released).split("->")
        assert int(before) > 0
        assert after == "0"


class Counted(WebSocketProtocol):
    """Keeps each protocol the server made, to look at its books after."""

    made: list[WebSocketProtocol] = []  # noqa: RUF012

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Counted.made.append(self)


@pytest.mark.parametrize(
    "headers",
    [
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",  # no key, no version
        (
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
        ),
        (
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"
        ),
    ],
    ids=["no-key", "bad-key", "old-version"],
)
async def test_an_upgrade_websockets_refuses_is_answered_and_forgotten(headers: bytes) -> None:
    """A malformed upgrade gets its 400 and leaves nothing behind: not in the
    server's connections (which the server waits on to stop), and the server
    stops at once."""
    Counted.made.clear()
    async with serve(echo, lifespan="off", ws=Counted, stop_seconds=5) as base:
        port = int(base.rsplit(":", 1)[1])
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n")
            answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # until it closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
            head, _, body = answer.partition(b"\r\n\r\n")
            head += b"\r\n"
            assert b"\r\ncontent-type: application/problem+json\r\n" in head.lower()
            problem = json.loads(body)
            assert (problem["status"], problem["title"]) == (400, "Bad Request")
            assert problem["detail"].startswith("Not a valid WebSocket handshake")
            assert f"\r\nx-request-id: {problem['instance']}\r\n".encode() in head.lower()
            assert b"short" not in body  # the offending value is named, never quoted
        # the last socket may be answered before its connection_lost ran
        async with asyncio.timeout(TIMEOUT):
            # the server's books have no event to wait on
            while any(protocol in protocol.connections for protocol in Counted.made):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert len(Counted.made) == 3


async def test_a_frame_above_the_size_limit_closes_with_1009() -> None:
    async with serve(echo, lifespan="off", ws=WebSocketProtocol, ws_max_size=1024) as base:
        url = base.replace("http://", "ws://") + "/ws"
        async with connect(url) as socket:
            await socket.send("x" * 1024)
            assert await socket.recv() == "x" * 1024
            await socket.send("x" * 1025)
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_a_client_that_never_answers_pings_is_closed() -> None:
    async with serve(
        echo, lifespan="off", ws=WebSocketProtocol, ws_ping_interval=0.1, ws_ping_timeout=0.2
    ) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(websocket_upgrade("/ws", host))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101")
        # pings arrive, then, unanswered, a close frame and the end of the stream
        received = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
    frames = []
    while received:  # a server's frames are not masked; these are short
        length = received[1] & 0x7F
        frames.append((received[0] & 0x0F, received[2 : 2 + length]))
        received = received[2 + length :]
    assert frames[0][0] == 0x9
    opcode, payload = frames[-1]
    assert opcode == 0x8
    assert int.from_bytes(payload[:2], "big") == 1011


async def test_inbox_hands_items_over_in_order_and_wakes_a_waiting_reader() -> None:
    inbox = Inbox()
    assert inbox.empty()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)  # one turn of the loop: the reader starts and waits
    assert not reader.done()
    inbox.put_nowait("first")
    inbox.put_nowait("second")
    assert await asyncio.wait_for(reader, TIMEOUT) == "first"
    assert inbox.qsize() == 1
    assert await inbox.get() == "second"
    assert inbox.empty()


async def test_inbox_passes_a_wake_up_on_when_its_reader_is_cancelled() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)  # both wait
    inbox.put_nowait("only")
    first.cancel()
    assert await asyncio.wait_for(second, TIMEOUT) == "only"
    assert first.cancelled()


async def test_write_gate_holds_writers_until_it_opens() -> None:
    gate = WriteGate()
    assert gate.is_set()
    assert await gate.wait()
    gate.clear()
    waiting = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # they wait
    assert not any(task.done() for task in waiting)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT) == [True, True, True]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frames_encoded_once_parse_as_websockets_reads_them(size: int) -> None:
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    text = "é" * (size // 2) + "x" * (size % 2)
    for encoded, opcode, payload in (
        (text_frame(text), Opcode.TEXT, text.encode()),
        (binary_frame(b"\x01" * size), Opcode.BINARY, b"\x01" * size),
    ):
        reader = StreamReader()
        reader.feed_data(encoded)
        parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
        with pytest.raises(StopIteration) as parsed:
            next(parser)
        frame = parsed.value.value
        assert (frame.opcode, frame.fin, frame.data) == (opcode, True, payload)
        assert not reader.buffer  # nothing left over


async def frames_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Writes encoded frames straight to the transport: `before` is what
    `write_frame` answered before the accept, then each text received comes
    back twice, the second time as an encoded frame; `pause` reports what it
    answers while the transport is paused."""
    protocol = frames_of(scope)
    assert protocol is not None
    assert (await receive())["type"] == "websocket.connect"
    before = protocol.write_frame(text_frame("too early"))
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": f"before:{before}"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message["text"]
        if text == "pause":
            protocol.pause_writing()
            paused = protocol.write_frame(text_frame("while paused"))
            protocol.resume_writing()
            await send({"type": "websocket.send", "text": f"paused:{paused}"})
        elif text == "close":
            await send({"type": "websocket.close", "code": 1000})
            assert protocol.write_frame(text_frame("after close")) is False
            return
        else:
            await send({"type": "websocket.send", "text": text})
            assert protocol.write_frame(text_frame(text.upper()))


async def test_encoded_frames_go_straight_out_only_while_the_socket_can_take_them() -> None:
    async with serve(frames_app, lifespan="off") as base:
        url = base.replace("http://", "ws://") + "/ws"
        async with connect(url) as socket:
            assert await socket.recv() == "before:False"
            await socket.send("hello")
            assert [await socket.recv(), await socket.recv()] == ["hello", "HELLO"]
            await socket.send("pause")
            assert await socket.recv() == "paused:False"
            await socket.send("close")
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000


def test_a_scope_from_another_server_has_no_frame_writer() -> None:
    assert frames_of({"type": "websocket", "extensions": {}}) is None
    assert frames_of({"type": "websocket"}) is None


async def accepted(
    scope: Scope, receive: Receive, send: Send, protocols: list[WebSocketProtocol]
) -> None:
    """Accepts the socket, and keeps its server protocol in `protocols`."""
    await receive()
    await send({"type": "websocket.accept"})
    protocol = frames_of(scope)
    assert protocol is not None
    protocols.append(protocol)


async def stall(base: str, stalled: socket.socket, protocols: list[WebSocketProtocol]) -> None:
    """Opens a socket on `stalled` that reads nothing; returns once the
    server's transport holds bytes, so the kernel's buffers are full."""
    host, port = base.removeprefix("http://").split(":")
    stalled.connect((host, int(port)))
    stalled.sendall(websocket_upgrade("/ws", host))
    deadline = time.monotonic() + TIMEOUT
    while not (protocols and protocols[0].transport.get_write_buffer_size()):
        assert time.monotonic() < deadline, "the server's buffers never filled"
        await asyncio.sleep(0.01)


async def test_a_server_held_open_by_a_peer_that_reads_nothing_fails_to_stop_rather_than_hang() -> (
    None
):
    protocols: list[WebSocketProtocol] = []

    async def flood(scope: Scope, receive: Receive, send: Send) -> None:
        await accepted(scope, receive, send, protocols)
        while True:  # waits once the transport is paused
            await send({"type": "websocket.send", "bytes": bytes(65536)})

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        with pytest.raises(AssertionError, match=r"1 connection\(s\) still open"):
            async with serve(flood, lifespan="off", stop_seconds=0.5) as base:
                await stall(base, stalled, protocols)
    finally:
        stalled.close()


async def test_pings_from_a_peer_that_reads_no_pongs_stop_being_read() -> None:
    """Each ping is answered with a pong; a peer that sends pings and reads
    nothing would have the server keep a byte of pong for each byte it sent.
    Once the pongs fill the write buffer, the server reads no more."""
    protocols: list[WebSocketProtocol] = []

    async def quiet(scope: Scope, receive: Receive, send: Send) -> None:
        await accepted(scope, receive, send, protocols)
        while (await receive())["type"] != "websocket.disconnect":
            pass

    # a masked ping with 125 bytes of payload (a zero mask leaves it as is)
    pings = (b"\x89\xfd" + bytes(4) + b"p" * 125) * 512
    flooder = socket.socket()
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    try:
        async with serve(quiet, lifespan="off", stop_seconds=5) as base:
            host, port = base.removeprefix("http://").split(":")
            flooder.connect((host, int(port)))
            flooder.sendall(websocket_upgrade("/ws", host))
            async with asyncio.timeout(TIMEOUT):
                while not protocols:  # noqa: ASYNC110 - the app's own list, no event
                    await asyncio.sleep(0.01)
            flooder.setblocking(False)
            stalled_since = None
            while sent < 32 * 1024 * 1024:
                try:
                    # whole frames only: a partial send goes on where it stopped
                    sent += flooder.send(pings[sent % len(pings) :])
                    stalled_since = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled_since = stalled_since or now
                    if now - stalled_since > 2:
                        break  # the server reads no more
                    await asyncio.sleep(0.01)
            buffered = protocols[0].transport.get_write_buffer_size()
            flooder.close()
    finally:
        flooder.close()
    assert buffered < 1024 * 1024
    assert sent < 32 * 1024 * 1024


async def test_a_peer_that_reads_nothing_and_answers_no_ping_is_cut() -> None:
    """The ping times out with the server's buffers full: the close frame
    cannot reach the peer, so the connection is cut, and the app hears the
    disconnect (a close would have waited for the peer to read, for good)."""
    protocols: list[WebSocketProtocol] = []
    ended = asyncio.Event()

    async def flood(scope: Scope, receive: Receive, send: Send) -> None:
        await accepted(scope, receive, send, protocols)
        try:
            while True:  # waits once the transport is paused
                await send({"type": "websocket.send", "bytes": bytes(65536)})
        finally:  # any way the socket ends will do
            ended.set()

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        async with serve(
            flood, lifespan="off", ws=WebSocketProtocol, ws_ping_interval=0.2, ws_ping_timeout=0.3
        ) as base:
            await stall(base, stalled, protocols)
            await asyncio.wait_for(ended.wait(), TIMEOUT)
    finally:
        stalled.close()


async def test_a_close_the_peer_cannot_read_is_cut_when_its_time_runs_out() -> None:
    """The app closes a socket whose peer reads nothing: when the close
    handshake's time runs out, the connection is cut rather than left to
    drain for good, and the app's server can stop."""
    protocols: list[WebSocketProtocol] = []
    closing = asyncio.Event()

    async def flood_then_close(scope: Scope, receive: Receive, send: Send) -> None:
        await accepted(scope, receive, send, protocols)
        protocols[0].close_timeout = 0.3
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(1):
                while True:  # until the transport is paused
                    await send({"type": "websocket.send", "bytes": bytes(65536)})
        await send({"type": "websocket.close", "code": 1012})
        closing.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass

    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        async with serve(flood_then_close, lifespan="off", stop_seconds=5) as base:
            await stall(base, stalled, protocols)
            await asyncio.wait_for(closing.wait(), TIMEOUT)
            # the server stops within its time: the connection was cut
    finally:
        stalled.close()
