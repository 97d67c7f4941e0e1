"""chat.connection: frames reach a socket in order, straight or through the outbox."""

from __future__ import annotations

import asyncio
from typing import Any

from chat.connection import Connection
from kit.security import Principal
from kit.websocket import FRAMES_EXTENSION, text_frame


class Transport:
    """A socket's frame writer (`kit.websocket`) that can refuse, as a paused one does."""

    def __init__(self) -> None:
        self.taking = True
        self.frames: list[bytes] = []

    def write_frame(self, frame: bytes) -> bool:
        if self.taking:
            self.frames.append(frame)
        return self.taking


class Socket:
    """What `Connection` uses of a Starlette WebSocket: its scope and `send_text`."""

    def __init__(self, transport: Transport) -> None:
        self.scope: dict[str, Any] = {"extensions": {FRAMES_EXTENSION: transport}}
        self.transport = transport
        self.gate = asyncio.Event()
        self.gate.set()

    async def send_text(self, text: str) -> None:
        await self.gate.wait()  # the ASGI way waits while the transport is paused
        self.transport.frames.append(text_frame(text))

    async def close(self, code: int, reason: str) -> None:
        self.transport.frames.append(b"close")


PRINCIPAL = Principal(
    user_id="u1", name="Ann", roles=frozenset(), jti="j", issued_at=0, expires_at=2**40
)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_frames_go_straight_out_while_idle_and_in_order_once_one_had_to_wait() -> None:
    transport = Transport()
    socket = Socket(transport)
    connection = Connection(websocket=socket, principal=PRINCIPAL, room="r", limit=8)  # type: ignore[arg-type]
    assert connection.start(after=0, first_frames=[], replay=None, close_on_expiry=False)
    await settle()  # the writer is idle, waiting on an empty outbox
    assert connection.push(1, "one", text_frame("one"))
    assert transport.frames == [text_frame("one")]  # written there and then
    assert connection.queued == 0
    # the transport is paused: the frame waits in the outbox for the writer...
    transport.taking = False
    socket.gate.clear()
    assert connection.push(2, "two", text_frame("two"))
    assert connection.queued == 1
    # ...and a frame pushed once the transport takes frames again waits behind it
    transport.taking = True
    assert connection.push(3, "three", text_frame("three"))
    assert transport.frames == [text_frame("one")]
    socket.gate.set()
    await settle()
    assert transport.frames == [text_frame(text) for text in ("one", "two", "three")]
    # the writer is idle again: straight out; an id already sent is never sent twice
    assert connection.push(0, "presence")
    assert transport.frames[-1] == text_frame("presence")
    assert connection.push(3, "three", text_frame("three"))
    await settle()
    assert len(transport.frames) == 4
    connection.request_close(1000, "")
    await settle()
    assert transport.frames[-1] == b"close"
    writer = connection.writer
    assert writer is not None
    await writer
