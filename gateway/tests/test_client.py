"""gateway.client: the proxy's keep-alive HTTP/1.1 client, against replicas
that answer byte for byte as each test says."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.client import (
    BUFFER_LIMIT,
    KEEPALIVE_SECONDS,
    MAX_RESPONSE_HEAD_BYTES,
    UpstreamBroken,
    UpstreamClient,
    UpstreamResponse,
)
from gateway.pool import not_listening
from gateway.upstream import ConnectFailed
from kit_testing import free_port

from .conftest import eventually

TIMEOUT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


@dataclass
class Request:
    head: bytes
    body: bytes

    @property
    def lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")

    def header(self, name: bytes) -> bytes | None:
        for line in self.lines[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request as a replica reads it (None when the connection ends)."""
    try:
        request = Request(await reader.readuntil(b"\r\n\r\n"), b"")
        length = request.header(b"content-length")
        if length is not None:
            request.body = await reader.readexactly(int(length))
        elif request.header(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                request.body += chunk[:-2]
    except (asyncio.IncompleteReadError, ConnectionError):
        return None  # the client left, mid-request or between requests
    return request


Answer = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Replica:
    """A replica on a loopback port: `answer` writes each request's response
    and says whether to keep the connection open."""

    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)


@contextlib.asynccontextmanager
async def replica(answer: Answer) -> AsyncIterator[Replica]:
    state = Replica(answer)
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while (request := await read_request(reader)) is not None:
                state.requests.append(request)
                if not await state.answer(request, writer):
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        # connections the client keeps open end with the replica
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def answering(*responses: bytes, split: bool = False) -> Answer:
    """Answers each request with the next response (the last one repeats)."""
    queue = list(responses)

    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        response = queue.pop(0) if len(queue) > 1 else queue[0]
        if split:
            for index in range(len(response)):
                writer.write(response[index : index + 1])
                await writer.drain()
        else:
            writer.write(response)
        await writer.drain()
        return True

    return answer


async def get(
    client: UpstreamClient,
    port: int,
    *,
    method: str = "GET",
    target: bytes = b"/catalog/ping",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
    read_timeout: float = TIMEOUT,
    replayable: bool = True,
) -> UpstreamResponse:
    return await client.request(
        "127.0.0.1",
        port,
        method,
        target,
        headers if headers is not None else [("host", "shop.example")],
        body,
        read_timeout=read_timeout,
        replayable=replayable,
    )


async def whole(response: UpstreamResponse) -> bytes:
    body = b""
    while chunk := await response.read(TIMEOUT):
        body += chunk
    response.release()
    return body


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(connect_timeout=TIMEOUT)
    yield upstream
    upstream.close()


async def test_responses_split_at_every_byte_arrive_whole_on_one_kept_connection(
    client: UpstreamClient,
) -> None:
    async with replica(answering(OK, split=True)) as server:
        for _ in range(3):
            response = await get(client, server.port)
            assert response.status == 200
            assert response.header(b"content-type") == b"text/plain"
            assert (b"Content-Length", b"5") in response.raw_headers
            assert await whole(response) == b"hello"
        assert server.connections == 1
        first = server.requests[0]
        assert first.lines[0] == b"GET /catalog/ping HTTP/1.1"
        assert first.header(b"host") == b"shop.example"


async def test_a_request_without_host_gets_the_replicas_and_a_body_in_hand_its_length(
    client: UpstreamClient,
) -> None:
    async with replica(answering(OK)) as server:
        response = await get(client, server.port, method="POST", headers=[], body=b"abc")
        await whole(response)
        sent = server.requests[0]
        assert sent.header(b"host") == f"127.0.0.1:{server.port}".encode()
        assert sent.header(b"content-length") == b"3"
        assert sent.body == b"abc"


async def test_a_streamed_body_without_a_length_goes_chunked(client: UpstreamClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two ", b"three"):
            yield part

    async with replica(answering(OK)) as server:
        response = await get(client, server.port, method="PUT", body=parts(), replayable=False)
        assert await whole(response) == b"hello"
        sent = server.requests[0]
        assert sent.header(b"transfer-encoding") == b"chunked"
        assert sent.body == b"one two three"


async def test_chunked_and_close_delimited_bodies_are_read_to_their_end(
    client: UpstreamClient,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"

    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.lines[0].startswith(b"GET /chunked"):
            writer.write(chunked)
            return True
        writer.write(until_close)
        return False

    async with replica(answer) as server:
        response = await get(client, server.port, target=b"/chunked")
        assert await whole(response) == b"abcde"
        response = await get(client, server.port, target=b"/close")
        assert await whole(response) == b"all of it"
        # the closed connection is not taken again
        response = await get(client, server.port, target=b"/chunked")
        assert await whole(response) == b"abcde"
        assert server.connections == 2


async def test_a_head_answer_has_no_body_whatever_its_length_says(client: UpstreamClient) -> None:
    async with replica(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")) as server:
        response = await get(client, server.port, method="HEAD")
        assert response.status == 200
        assert response.complete()
        assert await whole(response) == b""
        response = await get(client, server.port, method="HEAD")
        assert response.complete()
        response.release()


async def test_an_interim_answer_is_skipped(client: UpstreamClient) -> None:
    async with replica(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
        response = await get(client, server.port)
        assert response.status == 200
        assert await whole(response) == b"hello"


async def test_a_kept_connection_closed_under_a_request_is_retried_only_when_replayable(
    client: UpstreamClient,
) -> None:
    answered = 0

    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if answered == 1 and len(request.body) == 0 and request.header(b"x-once") is None:
            # the replica's keep-alive ran out as the request arrived
            answered += 1
            return False
        answered += 1
        writer.write(OK)
        return True

    async with replica(answer) as server:
        await whole(await get(client, server.port))
        response = await get(client, server.port)
        assert await whole(response) == b"hello"
        assert server.connections == 2
        assert len(server.requests) == 3  # sent twice: the first went unanswered

    answered = 0
    async with replica(answer) as server:
        await whole(await get(client, server.port))
        with pytest.raises(UpstreamBroken):
            await get(client, server.port, method="POST", replayable=False)
        assert server.connections == 1


async def test_garbage_and_a_connection_lost_mid_answer_are_broken(
    client: UpstreamClient,
) -> None:
    async with replica(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")) as server:
        server.answer = cut_after(server.answer)
        response = await get(client, server.port)
        with pytest.raises(UpstreamBroken):
            await whole(response)
    async with replica(answering(b"SMTP ready\r\n\r\n")) as server:
        with pytest.raises(UpstreamBroken):
            await get(client, server.port)


@pytest.mark.parametrize("status", [b"000", b"099", b"101", b"600", b"999"])
async def test_a_final_status_outside_200_to_599_is_broken(
    client: UpstreamClient, status: bytes
) -> None:
    """The parser takes any three digits; nothing outside 200-599 (or a 101
    to a request that asked for no upgrade) is an answer to give a client."""
    head = b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nhi"
    async with replica(answering(head)) as server:
        with pytest.raises(UpstreamBroken, match=f"status {status.decode()}"):
            await get(client, server.port)


def endless(start: bytes, line: bytes) -> Answer:
    """Answers with `start`, then `line` over and over until the client goes."""

    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(start)
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(line * 64)
                await writer.drain()
        return False

    return answer


@pytest.mark.parametrize(
    ("start", "line"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"a" * 100 + b"\r\n"),  # header after header
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 100),  # one header without end
        (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # interim answers without end
    ],
)
async def test_a_head_without_end_is_broken_at_its_bound(
    client: UpstreamClient, start: bytes, line: bytes
) -> None:
    async with replica(endless(start, line)) as server:
        with pytest.raises(UpstreamBroken, match=f"a head over {MAX_RESPONSE_HEAD_BYTES} bytes"):
            await get(client, server.port)


async def test_a_large_head_within_the_bound_and_a_few_trailers_pass() -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 100) for n in range(500))
    answer = (
        b"HTTP/1.1 200 OK\r\n" + headers + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    assert 50_000 < len(headers) < MAX_RESPONSE_HEAD_BYTES
    upstream = UpstreamClient(connect_timeout=TIMEOUT)
    try:
        async with replica(answering(answer)) as server:
            response = await get(upstream, server.port)
            assert response.status == 200
            assert len(response.raw_headers) == 501
            assert await whole(response) == b"hello"
            # and the connection serves the next request
            assert await whole(await get(upstream, server.port)) == b"hello"
            assert server.connections == 1
    finally:
        upstream.close()


async def test_trailers_without_end_are_broken_at_the_bound(client: UpstreamClient) -> None:
    start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    async with replica(endless(start, b"X-Trailer: " + b"a" * 100 + b"\r\n")) as server:
        response = await get(client, server.port)
        assert await response.read(TIMEOUT) == b"hello"
        with pytest.raises(UpstreamBroken, match=f"trailers over {MAX_RESPONSE_HEAD_BYTES} bytes"):
            await response.read(TIMEOUT)


def cut_after(answer: Answer) -> Answer:
    async def cut(request: Request, writer: asyncio.StreamWriter) -> bool:
        await answer(request, writer)
        return False

    return cut


async def test_silence_is_a_timeout_for_the_head_and_for_the_body(client: UpstreamClient) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.lines[0].startswith(b"GET /half"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await asyncio.Event().wait()
        return False

    async with replica(silent) as server:
        with pytest.raises(TimeoutError):
            await get(client, server.port, read_timeout=0.2)
        # what came is read however slow the machine; the silence after it times out
        response = await get(client, server.port, target=b"/half", read_timeout=5)
        assert await response.read(5) == b"half"
        with pytest.raises(TimeoutError):
            await response.read(0.2)
        response.release()


async def test_a_refused_connection_fails_before_anything_is_sent(client: UpstreamClient) -> None:
    with pytest.raises(ConnectFailed) as failed:
        await get(client, free_port())
    assert not_listening(failed.value)


async def test_reading_pauses_while_the_client_is_behind_and_loses_nothing(
    client: UpstreamClient,
) -> None:
    size = 8 * BUFFER_LIMIT
    payload = bytes(index % 251 for index in range(size))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    async with replica(answering(head + payload)) as server:
        response = await get(client, server.port)
        (connection,) = client._open

        async def paused() -> bool:
            return connection.reading_paused

        await eventually(paused)
        assert await whole(response) == payload
        # read to the end, the connection serves the next request
        await whole(await get(client, server.port))
        assert server.connections == 1


async def test_a_request_whose_body_failed_midway_leaves_no_connection_behind(
    client: UpstreamClient,
) -> None:
    class Gone(Exception):
        pass

    async def cut_short() -> AsyncIterator[bytes]:
        yield b"first part"
        raise Gone

    async with replica(answering(OK)) as server:
        await whole(await get(client, server.port))
        with pytest.raises(Gone):
            await get(client, server.port, method="PUT", body=cut_short(), replayable=False)
        assert not client._open  # the half-written request's connection is closed
        assert await whole(await get(client, server.port)) == b"hello"
        assert server.connections == 2


async def test_a_connection_idle_past_the_keep_alive_limit_is_not_used(
    client: UpstreamClient,
) -> None:
    async with replica(answering(OK)) as server:
        await whole(await get(client, server.port))
        (kept,) = client._open
        kept.idle_since -= KEEPALIVE_SECONDS + 1  # idle for longer than the limit
        assert await whole(await get(client, server.port)) == b"hello"
        assert kept.closed
        assert server.connections == 2
