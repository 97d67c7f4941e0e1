"""The edge protects itself: slow or oversized request heads, stalled bodies,
too many connections from one address, bodies over the limit and ambiguous
headers are refused at the gateway, as problem+json, before any upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.config import Settings
from gateway.edge import MAX_PIPELINED, EdgeHttpProtocol
from gateway.main import Gateway, create_app
from kit_testing import TokenMinter, serve

from .conftest import eventually, gateway_settings, running_upstream, urls
from .upstreams import Upstream


@contextlib.asynccontextmanager
async def guarded_gateway(
    settings: Settings, minter: TokenMinter
) -> AsyncIterator[tuple[Gateway, str]]:
    """The gateway under uvicorn with the edge protocol, as its image runs it."""
    app = create_app(settings, key_source=minter.key_source)
    async with serve(app, http=EdgeHttpProtocol) as base_url:
        yield app, base_url


@contextlib.asynccontextmanager
async def edge(
    redis_url: str, minter: TokenMinter, **overrides: Any
) -> AsyncIterator[tuple[Upstream, Gateway, str]]:
    async with running_upstream("one") as (service, upstream_url):
        values: dict[str, Any] = {
            "catalog_upstream": urls(upstream_url),
            "chat_upstream": urls(upstream_url),
            "header_timeout_seconds": 0.5,
            "body_idle_timeout_seconds": 0.5,
            "max_body_bytes": 4096,
            **overrides,
        }
        settings = gateway_settings(redis_url, **values)
        async with guarded_gateway(settings, minter) as (app, base_url):
            yield service, app, base_url


async def open_raw(base_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base_url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until_closed(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(within):
        return await reader.read()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, json.loads(body)


async def test_a_request_head_sent_too_slowly_is_cut_off(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter) as (service, _app, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n")  # and never the end
        raw = await read_until_closed(reader)
        writer.close()
        idle_reader, idle_writer = await open_raw(base_url)  # never sends a byte
        idle = await read_until_closed(idle_reader)
        idle_writer.close()
        async with httpx.AsyncClient(base_url=base_url) as http:
            metrics = (await http.get("/metrics")).text
    status, headers, body = parse_response(raw)
    assert status == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert body["detail"] == "The request head did not arrive in time"
    assert idle == b""  # nothing was asked, so nothing is answered
    assert service.hits == 0
    assert 'gateway_edge_refusals_total{reason="header_timeout"} 2.0' in metrics


async def test_each_request_on_a_kept_alive_connection_has_its_own_deadline(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter, header_timeout_seconds=1.0) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        request = b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n"
        for _ in range(3):  # each well within the deadline, together beyond it
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.4)  # a client pausing between requests, not a wait on the server
        writer.close()
    assert service.hits == 3


async def test_a_later_head_stalling_on_a_kept_alive_connection_is_cut_off(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter, header_timeout_seconds=1.0) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: ed")  # and never the rest
        raw = await read_until_closed(reader)
        writer.close()
    status, _, body = parse_response(raw)
    assert head.startswith(b"HTTP/1.1 200")
    assert status == 408
    assert body["detail"] == "The request head did not arrive in time"
    assert service.hits == 1


STREAMED = b"GET /catalog/stream?chunks=2&size=64 HTTP/1.1\r\nHost: edge\r\n\r\n"
ECHO = b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n"
PARTIAL_HEAD = b"GET /catalog/echo HTTP/1.1\r\nHost: ed"  # and never the rest


def answers(raw: bytes) -> list[tuple[int, bytes]]:
    """Each answer on a connection, in order: its status and its whole body
    (chunked or by length)."""
    found: list[tuple[int, bytes]] = []
    while raw:
        head, separator, raw = raw.partition(b"\r\n\r\n")
        assert separator, f"a head cut short: {head!r}"
        status = int(head.split(b" ", 2)[1])
        fields = head.lower().split(b"\r\n")
        if b"transfer-encoding: chunked" in fields:
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                assert raw[size : size + 2] == b"\r\n", "a chunk cut short or written into"
                body, raw = body + raw[:size], raw[size + 2 :]
                if size == 0:
                    break
        else:
            (length,) = (int(f.split(b": ")[1]) for f in fields if f.startswith(b"content-length"))
            body, raw = raw[:length], raw[length:]
        found.append((status, body))
    return found


async def head_timeouts(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url) as http:
        metrics = (await http.get("/metrics")).text
    name = 'gateway_edge_refusals_total{reason="header_timeout"} '
    return int(float(metrics.split(name, 1)[1].split()[0])) if name in metrics else 0


@pytest.mark.parametrize("queued", [0, 1])
async def test_a_head_late_behind_an_answer_going_out_never_cuts_that_answer(
    redis_url: str, minter: TokenMinter, queued: int
) -> None:
    """The next request's head stalls while an earlier answer streams (with
    `queued` complete requests waiting behind it): every request read is
    answered whole, nothing is written into an answer, the last says the
    connection closes, and it does; the late request was never read, so it
    gets nothing."""
    async with edge(redis_url, minter) as (service, _, base_url):
        service.release_stream.clear()
        reader, writer = await open_raw(base_url)
        writer.write(STREAMED + ECHO * queued + PARTIAL_HEAD)
        first = await reader.readuntil(b"a" * 64)  # the answer has begun

        async def head_timed_out() -> bool:
            return await head_timeouts(base_url) == 1

        await eventually(head_timed_out)
        service.release_stream.set()
        raw = first + await read_until_closed(reader)
        writer.close()
    streamed, *echoed = answers(raw)
    assert streamed == (200, b"a" * 64 + b"b" * 64)
    assert [status for status, _ in echoed] == [200] * queued
    assert all(json.loads(body)["path"] == "/catalog/echo" for _, body in echoed)
    assert service.hits == 1 + queued
    if queued:  # the last answer not yet begun when the head timed out says so
        assert b"connection: close" in raw.rsplit(b"HTTP/1.1 ", 1)[1].lower()


async def test_a_stalled_body_is_cut_off(redis_url: str, minter: TokenMinter) -> None:
    async with edge(redis_url, minter) as (_, _app, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(
            b"POST /catalog/upload HTTP/1.1\r\nHost: edge\r\nContent-Length: 1000\r\n\r\n"
            + b"x" * 100
        )
        raw = await read_until_closed(reader)
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 408
    assert body["detail"] == "The request body stopped arriving"


@pytest.mark.parametrize(
    "head",
    [
        # one header line that never ends
        b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\nX-Pad: " + b"p" * 8192,
        # a complete head, just too big
        b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (n, b"p" * 100) for n in range(60))
        + b"\r\n",
    ],
)
async def test_an_oversized_request_head_is_refused(
    redis_url: str, minter: TokenMinter, head: bytes
) -> None:
    async with edge(redis_url, minter, max_header_bytes=4096) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(head)
        raw = await read_until_closed(reader)
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 431
    assert body["detail"] == "The request head exceeds 4096 bytes"
    assert service.hits == 0


async def test_a_large_body_answered_early_still_gets_its_answer(
    redis_url: str, minter: TokenMinter
) -> None:
    """The client sends everything before it reads: the refusal must not
    reset the connection under it, and the connection stays usable."""
    async with (
        edge(redis_url, minter, max_body_bytes=65536) as (service, _, base_url),
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        refused = await http.post("/catalog/upload", content=b"x" * (8 * 1024 * 1024))
        after = await http.get("/catalog/echo")
    assert refused.status_code == 413
    assert refused.json()["detail"] == "The request body exceeds 65536 bytes"
    assert after.status_code == 200
    assert service.hits == 1


async def test_a_body_arriving_with_its_head_is_not_counted_as_head(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter, max_header_bytes=1024) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(
            b"POST /catalog/upload HTTP/1.1\r\nHost: edge\r\nContent-Length: 4000\r\n"
            b"Connection: close\r\n\r\n" + b"b" * 4000
        )
        raw = await read_until_closed(reader)
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 200
    assert body["bytes"] == 4000
    assert service.hits == 1


async def test_pipelined_requests_beyond_the_queue_are_not_read(
    redis_url: str, minter: TokenMinter
) -> None:
    """A client that writes requests and reads nothing: at most MAX_PIPELINED
    wait behind the one being answered (each a request cycle in memory); the
    rest are not read, and the connection closes after the last answer."""
    async with edge(redis_url, minter) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n" * 5000)
        raw = await read_until_closed(reader, within=30)
        writer.close()
    answers = raw.count(b"HTTP/1.1 ")
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == answers
    assert MAX_PIPELINED < answers <= 3 * (MAX_PIPELINED + 1)
    assert service.hits == answers
    # the last answer says the connection ends with it
    last_head = raw.rsplit(b"HTTP/1.1 ", 1)[1].partition(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in last_head


async def test_a_few_pipelined_requests_are_all_answered(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter) as (service, _, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n" * MAX_PIPELINED)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        raw = await read_until_closed(reader, within=30)
        writer.close()
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == MAX_PIPELINED + 1
    assert service.hits == MAX_PIPELINED + 1


async def test_trailers_count_against_the_head_limit(redis_url: str, minter: TokenMinter) -> None:
    """Header lines after a chunked body: a few pass (and are not passed on),
    endless ones end the request as an oversized head would."""
    start = (
        b"POST /catalog/upload HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n1\r\na\r\n0\r\n"
    )
    async with edge(redis_url, minter, max_header_bytes=4096) as (_, _app, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(start + b"X-Checksum: abc\r\n\r\n")
        fine = await read_until_closed(reader)
        writer.close()
        reader, writer = await open_raw(base_url)
        writer.write(start)
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # 1.4 MB of trailers, unless cut off first
                writer.write(b"X-Trailer: filler\r\n" * 350)
                await writer.drain()
        endless = await read_until_closed(reader)
        writer.close()
    status, _, body = parse_response(fine)
    assert (status, body["bytes"]) == (200, 1)
    status, headers, body = parse_response(endless)
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    assert body["detail"] == "The request head exceeds 4096 bytes"


async def test_a_malformed_request_is_a_problem(redis_url: str, minter: TokenMinter) -> None:
    async with edge(redis_url, minter) as (_, _app, base_url):
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\nX-Bad: a\x00b\r\n\r\n")
        raw = await read_until_closed(reader)
        writer.close()
    status, headers, _ = parse_response(raw)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"


async def test_connections_per_client_address_are_capped(
    redis_url: str, minter: TokenMinter
) -> None:
    async with edge(redis_url, minter, max_connections_per_client=3, header_timeout_seconds=30) as (
        service,
        app,
        base_url,
    ):
        ws_base = base_url.replace("http://", "ws://")
        held = [await open_raw(base_url) for _ in range(2)]
        socket = await connect(f"{ws_base}/chat/ws/lobby")  # sockets count as well
        await socket.recv()
        reader, writer = await open_raw(base_url)
        writer.write(b"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\n\r\n")
        raw = await read_until_closed(reader)
        writer.close()
        status, headers, body = parse_response(raw)
        await socket.close()
        await asyncio.wait_for(service.ws_closed.wait(), 5)

        async def admitted() -> bool:
            async with httpx.AsyncClient(base_url=base_url) as http:
                return (await http.get("/catalog/echo")).status_code == 200

        await eventually(admitted)  # the socket's slot is free once it closed
        for _, held_writer in held:
            held_writer.close()
    assert status == 429
    assert headers["retry-after"] == "1"
    assert body["detail"] == "Too many open connections from this address (at most 3)"
    assert app.runtime.edge.connections == {}


async def test_a_body_over_the_limit_is_refused_at_the_edge(
    redis_url: str, minter: TokenMinter
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 1024

    async with (
        edge(redis_url, minter) as (service, _, base_url),
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        declared = await http.post("/catalog/upload", content=b"x" * 5000)
        streamed = await http.post("/catalog/upload", content=chunks())
        within = await http.post("/catalog/upload", content=b"z" * 4096)
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"
    assert declared.json()["detail"] == "The request body exceeds 4096 bytes"
    assert streamed.status_code == 413  # counted as it arrived: no Content-Length
    assert streamed.json()["detail"] == "The request body exceeds 4096 bytes"
    assert within.json()["bytes"] == 4096
    # the declared one never reached the service; the streamed one was cut short
    assert service.hits == 2


@pytest.mark.parametrize("name", ["Authorization", "Host"])
async def test_a_header_that_must_be_single_twice_is_a_400(
    redis_url: str, minter: TokenMinter, name: str
) -> None:
    async with edge(redis_url, minter) as (service, _, base_url):
        token = minter.token()
        reader, writer = await open_raw(base_url)
        second = f"Bearer {token}" if name == "Authorization" else "other"
        writer.write(
            f"GET /catalog/echo HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {token}\r\n"
            f"{name}: {second}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await read_until_closed(reader)
        writer.close()
        ws_base = base_url.replace("http://", "ws://")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{ws_base}/chat/ws/lobby",
                additional_headers=[("Authorization", f"Bearer {token}"), (name, second)],
            ):
                pass
    status, _, body = parse_response(raw)
    assert status == 400
    assert body["type"] == "urn:problem-type:duplicate-header"
    assert body["detail"] == f"Send one {name} header, not several"
    assert refused.value.response.status_code == 400
    assert service.hits == 0
    assert service.ws_connects == 0


async def test_an_upgrade_refused_with_problem_json_logs_no_server_error(
    redis_url: str, minter: TokenMinter, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused upgrade (401 here; 503 in a reconnect storm) is an answer, not
    a server error: uvicorn must not log that the handshake was left undone."""
    server_log = logging.getLogger("uvicorn.error")
    async with edge(redis_url, minter) as (_, _, base_url):
        # after the app set up its logging; uvicorn's logger does not propagate
        server_log.addHandler(caplog.handler)
        try:
            for _ in range(3):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(
                        base_url.replace("http://", "ws://") + "/chat/ws/lobby",
                        additional_headers={"Authorization": "Bearer not-a-token"},
                    ):
                        pass
                assert refused.value.response.status_code == 401
        finally:
            server_log.removeHandler(caplog.handler)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
