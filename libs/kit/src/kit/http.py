"""uvicorn's HTTP protocol, answering each response in one write where it can.

uvicorn writes a response's status line and headers when the app sends
`http.response.start`, and its body when the app sends `http.response.body`:
two `send()` system calls, two TCP segments and two wake-ups of the client
for a response that was complete in one turn of the event loop. Over
loopback or a container bridge, a send costs the sender the receiver's side
of TCP as well, and the head's send was the costliest line of a gateway
worker relaying small responses (a third of its samples, the body's another
eighth).

`HttpProtocol` hands uvicorn a `CoalescingTransport`: what is written in one
turn of the loop goes out in one `send()` at the start of the next turn (or
at once past `FLUSH_BYTES`, or before a close). A response whose body comes
later (a stream, a slow upstream) sends its head one turn late, which is
microseconds, and then each part as before. Everything else is uvicorn's
own: parsing, keep-alive, pipelining, flow control (the real transport still
pauses the writer once its buffer is full), upgrades (the socket gets the
real transport; it writes frames itself).

Run it with `uvicorn --http kit.http:HttpProtocol` (or
`UVICORN_HTTP=kit.http:HttpProtocol`); every image does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 64 * 1024
"""Written at once past this much, so a body streamed without a pause is
still paced by the transport's flow control."""


class CoalescingTransport:
    """A transport whose writes of one loop turn go out as one write.

    Delegates everything else to the real transport; a close, `write_eof` or
    `abort` first sends (or drops, for `abort`) what is pending, so nothing
    is reordered or lost.
    """

    __slots__ = ("_loop", "_pending", "_pending_bytes", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        pending = self._pending
        if pending is None:
            self._pending = pending = []
            self._loop.call_soon(self.flush)
        pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes > FLUSH_BYTES:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Sends what is pending (nothing once the transport is closing)."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_bytes = 0
        if self.transport.is_closing():
            return
        self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._pending_bytes = 0
        self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._pending_bytes

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, set_protocol, ...
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`."""

    coalescing: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self.coalescing)  # type: ignore[arg-type]

    def handle_websocket_upgrade(self) -> None:
        # the socket's protocol takes the connection over with the real
        # transport: nothing of HTTP is pending at an upgrade, and frames need
        # no help (nor a wrapper kept for each open socket)
        coalescing, self.coalescing = self.coalescing, None
        if coalescing is not None:
            coalescing.flush()
            self.transport = coalescing.transport
        super().handle_websocket_upgrade()
