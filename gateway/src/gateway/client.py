"""The proxy's HTTP/1.1 client: keep-alive connections to each replica on bare
asyncio transports, each response read by llhttp (httptools, the parser the
gateway's own server uses).

A proxied request needs little of a general client: the headers are already
the ones to send, the body is bytes or a stream from the client, and the
response goes to the client as it came (no decoding, no cookies, no
redirects). aiohttp's client did all of that and cost about 40% of a gateway
worker's CPU for a small request; this one does only what relaying needs:

- a request is written in one `write` when its body came whole (head and
  body together), else its head and then each chunk of the client's body as
  it arrives (chunked when the client gave no `Content-Length`), paced by the
  transport's flow control;
- a response is parsed as it arrives. Its head waits at most the route's read
  timeout; so does each wait for more of its body. Reading pauses while more
  than `BUFFER_LIMIT` bytes of it wait for the client, so a slow client holds
  back its upstream and not the gateway's memory;
- a connection goes back to its replica's idle list only when its response
  was read to the end and both sides allow keep-alive; anything else (an
  error, a client that left mid-response, `Connection: close`, a HEAD) closes
  it. Idle connections closed by the replica are dropped when the close
  arrives, and those idle longer than `KEEPALIVE_SECONDS` (4 s, under the
  services' 5 s) are closed rather than used;
- a request sent on a reused connection that the replica closed before
  answering (its keep-alive ran out as the request left) is sent again on a
  fresh connection when it can be sent twice (idempotent, body in hand), as
  browsers and Go's client do; otherwise it is a broken exchange.

Errors: `gateway.upstream.ConnectFailed` (nothing was sent), `TimeoutError` (no byte for the
read timeout), `UpstreamBroken` (garbage, or the connection lost mid-answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import AsyncIterable, Iterable

import httptools

from gateway.upstream import connect

BUFFER_LIMIT = 2**16
# idle connections are not used after this long: below the services' own
# keep-alive timeout (uvicorn's 5 s), so the gateway never writes a request
# into a connection the replica is closing
KEEPALIVE_SECONDS = 4.0
MAX_IDLE_PER_REPLICA = 256
MAX_RESPONSE_HEAD_BYTES = 65_536
"""The most a replica's answer may send before its body (interim 1xx answers
included), and the most of trailers after a chunked one: beyond it the answer
is garbage (a 502), not something the worker keeps growing for."""
_CHUNK_END = b"0\r\n\r\n"


class UpstreamBroken(Exception):
    """The replica answered garbage or the connection broke off before the
    response ended."""


class NoHttpStatus(Exception):
    """A final status outside 200-599 (raised through the parser)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"status {status:03d}")


class HeadTooLarge(Exception):
    """Trailers past MAX_RESPONSE_HEAD_BYTES (raised through the parser)."""

    def __init__(self) -> None:
        super().__init__(f"trailers over {MAX_RESPONSE_HEAD_BYTES} bytes")


class _Stale(UpstreamBroken):
    """A reused connection was closed by the replica before any byte of an answer."""


class UpstreamResponse:
    """One response as it arrives: its head, then its body in chunks."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_error",
        "_waiter",
        "done",
        "head_done",
        "keep_alive",
        "raw_headers",
        "status",
    )

    def __init__(self, connection: UpstreamConnection) -> None:
        self._connection: UpstreamConnection | None = connection
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header; `name` in lower case."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return None

    def complete(self) -> bool:
        """Whether the whole body is here already (then `body()` has it)."""
        return self.done

    def body(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return whole

    async def read(self, read_timeout: float) -> bytes:
        """The next part of the body; b"" once it has all been read."""
        while not self._chunks:
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(read_timeout)
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        connection = self._connection
        if connection is not None and connection.reading_paused and self._buffered <= BUFFER_LIMIT:
            connection.resume_reading()
        return chunk

    async def wait_head(self, read_timeout: float) -> None:
        while not self.head_done:
            if self._error is not None:
                raise self._error
            await self._wait(read_timeout)

    async def _wait(self, read_timeout: float) -> None:
        """Until the connection has news, or no byte came for `read_timeout` seconds."""
        connection = self._connection
        assert connection is not None
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # a timer per wait, not per byte: it fires `read_timeout` after the last byte
        quiet = time.monotonic() - connection.heard_at()
        timer = loop.call_later(max(0.0, read_timeout - quiet), connection.check_idle, read_timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def wake(self, error: BaseException | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        connection = self._connection
        if self._buffered > BUFFER_LIMIT and connection is not None:
            connection.pause_reading()
        self.wake()

    def release(self) -> None:
        """Done with it: the connection goes back to its pool if it can serve
        another request, else it is closed."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self.done and self.keep_alive and self._error is None:
            connection.finished()
        else:
            connection.close()

    def close(self) -> None:
        """Abandons the response (its client left): the connection closes."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        self.wake(UpstreamBroken("the response was abandoned"))


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a replica, one request at a time."""

    def __init__(self, client: UpstreamClient, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.reused = False
        self.reading_paused = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self.sent_at = 0.0
        self.head_request = False
        # a body that ends with the connection: no length, not chunked
        self._length_known = False
        # what came of the answer before its body, or of its trailers after it
        self._head_bytes = 0
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport's subclasses, only alike
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        response = self.response
        if response is None:
            # an idle connection has nothing to say; whatever this is, it is not ours
            self.close()
            return
        if response.done:
            # bytes after the end of the answer: this connection serves no other
            response.keep_alive = False
            return
        in_head = not response.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response.keep_alive = False
            self.on_message_complete()
        except httptools.HttpParserError as error:
            # a callback's own error is the parser's context, not its cause
            cause = error.__context__
            reason = cause if isinstance(cause, NoHttpStatus | HeadTooLarge) else error
            self.fail(UpstreamBroken(f"invalid response: {reason}"))
            return
        if in_head and not response.head_done and not response.done:
            # all of it head still (the parser holds a header line it has not
            # finished): counted, so an endless head is cut off
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                self.fail(
                    UpstreamBroken(f"invalid response: a head over {MAX_RESPONSE_HEAD_BYTES} bytes")
                )

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.forget(self)
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_exception(
                UpstreamBroken("the connection was lost while the body was sent")
            )
        response = self.response
        if response is None or response.done:
            return
        if response.head_done and not self._length_known and not self.head_request:
            # a body delimited by the end of the connection has ended
            response.done = True
            response.keep_alive = False
            response.wake()
            return
        if self.reused and not response.head_done and self.last_read == 0.0:
            self.fail(_Stale("the replica closed the idle connection"))
        else:
            self.fail(UpstreamBroken(f"the connection was lost: {exc or 'closed by the replica'}"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None or response.done:
            return
        if response.head_done:
            # a trailer: its head went out long ago, so it is only counted
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                raise HeadTooLarge
            return
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._length_known = True
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None or response.done:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # an interim answer: the final one follows on this connection
            response.raw_headers.clear()
            self._length_known = False
            return
        if not 200 <= status <= 599:
            # no HTTP status (the parser takes any three digits), or a 101 to a
            # request that asked for no upgrade: nothing a client could be given
            raise NoHttpStatus(status)
        response.status = status
        response.keep_alive = self.parser.should_keep_alive() and not self.head_request
        self._head_bytes = 0  # from here on, only trailers count
        if status in (204, 304):
            self._length_known = True
        response.head_done = True
        if self.head_request:
            # no body follows a HEAD's answer, whatever its length says; the
            # parser would wait for one, so this connection serves no other
            self._length_known = True
            response.done = True
        response.wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.done:
            response.feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.head_done or response.done:
            return
        response.done = True
        response.wake()

    # -- used by the client and the response ----------------------------------------

    def fail(self, error: UpstreamBroken) -> None:
        response = self.response
        self.close()
        if response is not None:
            response.wake(error)

    def heard_at(self) -> float:
        """When the replica last sent a byte, or (before it has) when the
        request went out; reading paused for a slow client counts as heard."""
        return max(self.last_read, self.sent_at)

    def check_idle(self, read_timeout: float) -> None:
        """The read timer fired: a timeout only if nothing came for `read_timeout` s."""
        response = self.response
        if response is None:
            return
        if time.monotonic() - self.heard_at() >= read_timeout * 0.999:
            response.wake(TimeoutError(f"no answer within {read_timeout:g} s"))
            self.close()
        else:
            response.wake()  # the waiter waits again, with a fresh timer

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            # the silence while paused was the client's, not the replica's
            self.last_read = time.monotonic()
            self.transport.resume_reading()

    def finished(self) -> None:
        """Its response was read to the end: ready for the next request."""
        self.response = None
        self.resume_reading()
        if self.closed:
            return
        self.reused = True
        self.idle_since = time.monotonic()
        self.client.idle(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.forget(self)
            if self.transport is not None:
                self.transport.close()

    async def send(
        self,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        *,
        chunked: bool,
        head_request: bool,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Writes one request and waits for the head of its response."""
        transport = self.transport
        assert transport is not None
        assert self.response is None
        response = self.response = UpstreamResponse(self)
        self.head_request = head_request
        self._length_known = False
        self._head_bytes = 0
        self.last_read = 0.0
        self.sent_at = time.monotonic()
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            transport.write(head + body if len(body) <= BUFFER_LIMIT else head)
            if len(body) > BUFFER_LIMIT:
                transport.write(body)
        else:
            transport.write(head)
            await self._stream(body, chunked=chunked, read_timeout=read_timeout)
        self.sent_at = time.monotonic()
        await response.wait_head(read_timeout)
        return response

    async def _stream(
        self, body: AsyncIterable[bytes], *, chunked: bool, read_timeout: float
    ) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.closed:
                raise UpstreamBroken("the connection was lost while the body was sent")
            if chunked:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._write_paused:
                # a replica that stops reading the body is as silent as one
                # that stops answering
                self._writable = asyncio.get_running_loop().create_future()
                async with asyncio.timeout(read_timeout):
                    await self._writable
        if chunked and not self.closed:
            transport.write(_CHUNK_END)


class UpstreamClient:
    """Keep-alive connections per replica, shared by every request of a worker."""

    def __init__(self, *, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._open: set[UpstreamConnection] = set()

    def idle(self, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= MAX_IDLE_PER_REPLICA:
            connection.close()
            return
        idle.append(connection)
        # the oldest idle one goes once its keep-alive ran out (it would be
        # used last anyway: the newest is taken first)
        oldest = idle[0]
        if connection.idle_since - oldest.idle_since > KEEPALIVE_SECONDS:
            oldest.close()

    def forget(self, connection: UpstreamConnection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _take_idle(self, key: tuple[str, int]) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if time.monotonic() - connection.idle_since > KEEPALIVE_SECONDS:
                connection.close()  # the replica may be closing it right now
                continue
            return connection
        return None

    async def connect(self, host: str, port: int) -> UpstreamConnection:
        """A new connection; raises ConnectFailed (nothing was sent)."""
        connection = UpstreamConnection(self, (host, port))
        await connect(connection, host, port, self.connect_timeout, abandon=connection.close)
        self._open.add(connection)
        return connection

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: bytes,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        read_timeout: float,
        replayable: bool,
    ) -> UpstreamResponse:
        """Sends one request to `host:port` and returns once its response's head
        is in. Raises ConnectFailed, TimeoutError or UpstreamBroken."""
        head, chunked = request_head(method, target, headers, body, f"{host}:{port}")
        head_request = method == "HEAD"
        connection = self._take_idle((host, port))
        if connection is not None:
            try:
                return await connection.send(
                    head,
                    body,
                    chunked=chunked,
                    head_request=head_request,
                    read_timeout=read_timeout,
                )
            except _Stale:
                if not replayable:
                    raise
            except BaseException:
                # a half-written request or an unread answer: nothing else can use it
                connection.close()
                raise
        connection = await self.connect(host, port)
        try:
            return await connection.send(
                head, body, chunked=chunked, head_request=head_request, read_timeout=read_timeout
            )
        except BaseException:
            connection.close()
            raise

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()


def request_head(
    method: str,
    target: bytes,
    headers: Iterable[tuple[str, str]],
    body: bytes | AsyncIterable[bytes] | None,
    authority: str,
) -> tuple[bytes, bool]:
    """The request line and headers, and whether the body goes chunked: a body
    still streaming with no `Content-Length` from the client. A body in hand
    without one gets its length; a request without `Host` gets the replica's."""
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target)]
    has_host = has_length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "host":
            has_host = True
        elif lowered == "content-length":
            has_length = True
        lines.append(f"{name}: {value}".encode("latin-1"))
    if not has_host:
        lines.append(f"Host: {authority}".encode("latin-1"))
    chunked = False
    if body is not None and not has_length:
        if isinstance(body, bytes):
            lines.append(b"Content-Length: %d" % len(body))
        else:
            lines.append(b"Transfer-Encoding: chunked")
            chunked = True
    lines.append(b"\r\n")
    return b"\r\n".join(lines), chunked
