"""gateway.upstream: the relay's WebSocket to a replica, against replicas that
answer byte for byte as the test says."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.pool import not_listening
from gateway.upstream import (
    ConnectFailed,
    Ended,
    HandshakeFailed,
    UpgradeRefused,
    UpstreamSocket,
    open_upstream,
)
from kit_testing import free_port

from .conftest import eventually
from .conftest import upgrade_accepted as accepted

TIMEOUT = 5.0
Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A server's frame (not masked)."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return bytes([first, len(payload)]) + payload
    return bytes([first, 126]) + len(payload).to_bytes(2, "big") + payload


@contextlib.asynccontextmanager
async def replica(answer: Answer) -> AsyncIterator[int]:
    """A replica on a loopback port that reads the upgrade's head and answers it."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        try:
            await answer(head, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def open_to(port: int, **options: object) -> UpstreamSocket:
    settings: dict[str, object] = {
        "subprotocols": [],
        "max_size": 1024,
        "connect_timeout": TIMEOUT,
    }
    settings.update(options)
    return await asyncio.wait_for(
        open_upstream(
            "127.0.0.1",
            port,
            b"/chat/ws/lobby?since=4",
            [("host", "edge.example"), ("authorization", "Bearer token")],
            **settings,  # type: ignore[arg-type]
        ),
        TIMEOUT,
    )


async def test_sends_the_clients_headers_and_takes_the_frames_behind_the_101() -> None:
    seen: list[bytes] = []

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(head)
        # the 101 and the first frame in one write, as a busy replica sends them
        w.write(accepted(head, extra=b"Sec-WebSocket-Protocol: bearer\r\n") + frame(1, b"ready"))
        await w.drain()
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port, subprotocols=["bearer", "token"])
        assert socket.subprotocol == "bearer"
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "ready"
        socket.abort()
    request = seen[0].decode()
    assert request.startswith("GET /chat/ws/lobby?since=4 HTTP/1.1\r\n")
    assert "host: edge.example\r\n" in request
    assert "authorization: Bearer token\r\n" in request
    assert "sec-websocket-protocol: bearer, token\r\n" in request


@pytest.mark.parametrize(
    "answer_bytes",
    [
        [b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"],
        # a body in a later packet, then one read to the end of the stream
        [b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\n", b"busy!"],
        [b"HTTP/1.1 404 Not Found\r\n\r\n", b"no such path"],
    ],
)
async def test_a_plain_http_answer_is_a_refusal_with_its_status(answer_bytes: list[bytes]) -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for chunk in answer_bytes:
            w.write(chunk)
            await w.drain()

    async with replica(answer) as port:
        with pytest.raises(UpgradeRefused) as refused:
            await open_to(port)
    assert refused.value.status == int(answer_bytes[0].split()[1])


async def test_a_101_that_fails_the_handshake_is_no_socket() -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n"
        )
        await w.drain()
        await reader.read()

    async with replica(answer) as port:
        with pytest.raises(HandshakeFailed):
            await open_to(port)


async def test_a_replica_that_hangs_up_during_the_handshake_is_no_socket() -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 101 Switch")

    async with replica(answer) as port:
        with pytest.raises(HandshakeFailed):
            await open_to(port)


async def test_a_port_nobody_listens_on_is_a_connect_failure() -> None:
    with pytest.raises(ConnectFailed) as failed:
        await open_to(free_port())
    assert not_listening(failed.value)


async def test_messages_in_fragments_arrive_whole_and_pings_are_answered() -> None:
    replies: list[bytes] = []

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head))
        w.write(frame(1, b"hel", fin=False) + frame(9, b"ping") + frame(0, b"lo"))
        w.write(frame(2, b"\x00", fin=False) + frame(0, b"\x01"))
        await w.drain()
        # the pong: a client's frame is masked (2 bytes of head, 4 of mask, 4 of payload)
        replies.append(await reader.readexactly(10))
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port)
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "hello"
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == b"\x00\x01"
        socket.abort()
    pong = replies[0]
    assert pong[0] == 0x8A
    mask = pong[2:6]
    assert bytes(byte ^ mask[index % 4] for index, byte in enumerate(pong[6:])) == b"ping"


async def test_a_message_above_the_limit_ends_the_socket_with_1009() -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head) + frame(1, b"x" * 1025))
        await w.drain()
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port, max_size=1024)
        ended = await asyncio.wait_for(socket.receive(), TIMEOUT)
        socket.abort()
    assert isinstance(ended, Ended)
    assert (ended.code, ended.lost) == (1009, False)


async def test_a_close_frame_ends_the_socket_and_is_echoed() -> None:
    echoed: list[bytes] = []

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head) + frame(8, (4001).to_bytes(2, "big") + b"bye"))
        await w.drain()
        echoed.append(await reader.readexactly(2 + 4 + 5))

    async with replica(answer) as port:
        socket = await open_to(port)
        ended = await asyncio.wait_for(socket.receive(), TIMEOUT)
        assert isinstance(ended, Ended)
        assert (ended.code, ended.reason, ended.lost) == (4001, "bye", False)
        assert socket.closed
        await asyncio.wait_for(socket.close(1000), TIMEOUT)  # the replica hung up
    assert echoed[0][0] == 0x88


async def test_a_replica_gone_without_a_close_frame_is_lost() -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head))
        await w.drain()

    async with replica(answer) as port:
        socket = await open_to(port)
        ended = await asyncio.wait_for(socket.receive(), TIMEOUT)
    assert isinstance(ended, Ended)
    assert (ended.code, ended.lost) == (1006, True)
    # and it stays ended for every later read
    assert await socket.receive() is ended


async def test_reading_stops_while_more_than_the_limit_waits_for_the_relay() -> None:
    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head) + frame(1, b"one") + frame(1, b"more"))
        await w.drain()
        await reader.read()

    async with replica(answer) as port:
        socket = UpstreamSocket(subprotocols=[], max_size=1024, read_limit=4)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: socket, "127.0.0.1", port)
        transport.write(socket.request(b"/chat/ws/lobby", [], f"127.0.0.1:{port}"))
        await asyncio.wait_for(socket.opened, TIMEOUT)

        async def paused() -> bool:
            return not transport.is_reading()

        await eventually(paused)  # 7 bytes waiting, above the limit of 4
        assert await socket.receive() == "one"
        assert not transport.is_reading()  # until the relay took them all
        assert await socket.receive() == "more"
        assert transport.is_reading()
        socket.abort()


def frame_head(opcode: int, length: int, *, fin: bool = True, masked: bool = False) -> bytes:
    first = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    if length < 126:
        return bytes([first, mask | length])
    if length < 65536:
        return bytes([first, mask | 126]) + length.to_bytes(2, "big")
    return bytes([first, mask | 127]) + length.to_bytes(8, "big")


async def test_frames_split_at_every_byte_read_the_same_as_whole() -> None:
    big = b"y" * 70_000  # a 64-bit length
    stream = (
        frame(1, "héllo".encode())
        + frame(1, b"frag", fin=False)
        + frame(9, b"p")
        + frame(0, b"ment")
        + frame_head(2, len(big))
        + big
        + frame(1, b"x" * 300)
    )

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head))
        for index in range(len(stream)):
            w.write(stream[index : index + 1])
            if index % 4096 == 0:
                await w.drain()
        await w.drain()
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port, max_size=100_000)
        received = [await asyncio.wait_for(socket.receive(), TIMEOUT) for _ in range(4)]
        socket.abort()
    assert received == ["héllo", "fragment", big, "x" * 300]


@pytest.mark.parametrize(
    ("broken", "code"),
    [
        (frame_head(1, 2, masked=True) + b"\x00\x00\x00\x00hi", 1002),  # masked by the server
        (bytes([0xC1, 2]) + b"hi", 1002),  # a reserved bit with no extension
        (frame(1, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (frame(0, b"lost"), 1002),  # a continuation of nothing
        (frame(9, b"p", fin=False), 1002),  # a fragmented ping
        (frame(8, (999).to_bytes(2, "big")), 1002),  # a close code nobody may send
        (frame(8, b"\x03"), 1002),  # a close payload of one byte
        (frame(3, b"?"), 1002),  # an opcode that does not exist
    ],
)
async def test_a_frame_that_breaks_the_protocol_ends_the_socket_with_a_close(
    broken: bytes, code: int
) -> None:
    answered: list[bytes] = []

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head) + frame(1, b"fine") + broken + frame(1, b"never read"))
        await w.drain()
        answered.append(await reader.readexactly(2))  # the close frame's head
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port)
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "fine"
        ended = await asyncio.wait_for(socket.receive(), TIMEOUT)
        socket.abort()
    assert isinstance(ended, Ended)
    assert (ended.code, ended.lost) == (code, False)
    assert answered[0][0] == 0x88  # a close frame went to the replica


class ClientSide:
    """Stands in for the client socket's frame writer (`kit.websocket`)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.taking = True

    def write_frame(self, encoded: bytes) -> bool:
        if self.taking:
            self.frames.append(encoded)
        return self.taking


async def test_whole_frames_pass_to_the_client_as_they_came_and_in_order() -> None:
    cues: asyncio.Queue[bytes] = asyncio.Queue()

    async def answer(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(accepted(head))
        while data := await cues.get():
            w.write(data)
            await w.drain()
        await reader.read()

    async with replica(answer) as port:
        socket = await open_to(port)
        client = ClientSide()
        socket.forward = client  # type: ignore[assignment]

        async def forwarded(count: int) -> None:
            async def arrived() -> bool:
                return len(client.frames) == count

            await eventually(arrived)

        # whole frames: the very bytes, nothing for the relay
        cues.put_nowait(frame(1, "héllo".encode()) + frame(2, b"\x00\x01"))
        await forwarded(2)
        assert client.frames == [frame(1, "héllo".encode()), frame(2, b"\x00\x01")]
        # the client's transport is paused: the relay gets it, and what follows
        # it waits behind it even once the client takes frames again
        client.taking = False
        cues.put_nowait(frame(1, b"two"))
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "two"
        client.taking = True
        cues.put_nowait(frame(1, b"three"))
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "three"
        socket.relayed()  # "two" was sent
        socket.relayed()  # and "three"
        # a message in fragments is the relay's too
        cues.put_nowait(frame(1, b"fo", fin=False) + frame(0, b"ur"))
        assert await asyncio.wait_for(socket.receive(), TIMEOUT) == "four"
        socket.relayed()
        cues.put_nowait(frame(1, b"five"))
        await forwarded(3)
        assert client.frames[-1] == frame(1, b"five")
        # text that is not UTF-8 is never passed on: the socket ends with 1007
        cues.put_nowait(frame(1, b"\xff\xfe"))
        ended = await asyncio.wait_for(socket.receive(), TIMEOUT)
        assert isinstance(ended, Ended)
        assert ended.code == 1007
        assert len(client.frames) == 3
        cues.put_nowait(b"")
        socket.abort()
