"""The floor of an HTTP relay written in Python: what relaying alone costs.

A keep-alive HTTP/1.1 relay on uvloop and httptools (the loop and the parser
the gateway runs on) with nothing else in it: no ASGI, no middleware, no
headers rewritten, no limits, no timeouts, no metrics, no retries. A request
is read whole, written to an idle connection to the upstream (a new one when
none is idle) and its answer written back whole to the client.

It serves the gateway benchmark as an anchor, as nginx does: the gap between
this relay and the gateway is what the gateway's features and its server
(uvicorn, ASGI) cost, the gap between this relay and nginx is Python's.
Only for bodiless requests of one client at a time per connection (wrk's
GETs); anything else closes the connection.

    python bench/floor_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque

import httptools
import uvloop


class Messages(asyncio.Protocol):
    """A connection whose incoming bytes are kept until httptools says a whole
    message (request or response) is in; then `message` gets its bytes."""

    def __init__(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser) -> None:
        self.parser = parser
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_complete(self) -> None:
        whole = b"".join(self.chunks)
        self.chunks = []
        self.message(whole)

    def message(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Upstream(Messages):
    """One keep-alive connection to the upstream, one exchange at a time."""

    def __init__(self, idle: deque[Upstream]) -> None:
        super().__init__(httptools.HttpResponseParser(self))
        self.idle = idle
        self.client: Downstream | None = None

    def message(self, data: bytes) -> None:
        client, self.client = self.client, None
        self.idle.append(self)
        if client is not None:
            client.answer(data)

    def send(self, client: Downstream, request: bytes) -> None:
        assert self.transport is not None
        self.client = client
        self.transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        self.close()

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
        super().close()


class Downstream(Messages):
    """One client connection."""

    def __init__(self, upstream: tuple[str, int], idle: deque[Upstream]) -> None:
        super().__init__(httptools.HttpRequestParser(self))
        self.upstream = upstream
        self.idle = idle
        self.connecting: asyncio.Task[None] | None = None

    def message(self, data: bytes) -> None:
        if self.idle:
            self.idle.pop().send(self, data)
        else:
            self.connecting = asyncio.ensure_future(self.connect_and_send(data))

    async def connect_and_send(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self.idle), *self.upstream)
        except OSError:
            self.close()
            return
        upstream.send(self, request)

    def answer(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve(port: int, upstream_port: int) -> None:
    idle: deque[Upstream] = deque()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Downstream(("127.0.0.1", upstream_port), idle), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
