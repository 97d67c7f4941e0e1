"""A response's head goes out with its body's first bytes, in one write."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.edge import EdgeHttpProtocol, HeadFirst
from gateway.main import create_app
from kit_testing import TokenMinter, serve

from .conftest import gateway_settings, running_upstream, urls
from .upstreams import Upstream


class Recorder:
    """A transport that keeps what each write call carried, one entry per call."""

    def __init__(self, transport: Any = None) -> None:
        self.transport = transport
        self.writes: list[bytes] = []
        self.closed_after: int | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, chunks: Any) -> None:
        chunks = [bytes(chunk) for chunk in chunks]
        self.writes.append(b"".join(chunks))
        if self.transport is not None:
            self.transport.writelines(chunks)

    def close(self) -> None:
        self.closed_after = len(self.writes)
        if self.transport is not None:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.closed_after is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def head_first() -> tuple[Recorder, HeadFirst]:
    """A `HeadFirst` over a transport that only records."""
    recorder = Recorder()
    return recorder, HeadFirst(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]


async def a_turn() -> None:
    """Lets the loop finish its current turn (and run what it scheduled)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_head_and_the_body_written_in_one_turn_are_one_write() -> None:
    recorder, writes = head_first()
    writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    writes.write(b"{}")
    writes.write(b"more")
    await a_turn()
    assert recorder.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"more"]


async def test_a_head_whose_body_is_late_goes_out_at_the_end_of_the_turn() -> None:
    recorder, writes = head_first()
    writes.write(b"head")
    assert recorder.writes == []
    await a_turn()
    assert recorder.writes == [b"head"]
    writes.write(b"body")
    await a_turn()
    assert recorder.writes == [b"head", b"body"]


async def test_closing_writes_the_held_head_first() -> None:
    recorder, writes = head_first()
    writes.write(b"head")
    writes.close()
    await a_turn()
    assert recorder.writes == [b"head"]
    assert recorder.closed_after == 1
    assert writes.is_closing()


async def test_a_request_cycles_writes_are_freed_without_the_garbage_collector() -> None:
    """Each answer's writes are done with once it is sent: nothing of them may
    wait for the cyclic collector (a cycle per answer made it run more often,
    pausing the loop, on every worker at load)."""
    gc.collect()
    gc.disable()
    try:
        for late_body in (False, True):
            recorder, writes = head_first()
            writes.write(b"head")
            if late_body:
                await a_turn()
            writes.write(b"body")
            await a_turn()
            assert recorder.writes == ([b"head", b"body"] if late_body else [b"headbody"])
            del recorder, writes
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0


RECORDED: list[Recorder] = []
"""Every connection `RecordingEdge` served, in order."""


class RecordingEdge(EdgeHttpProtocol):
    """The edge protocol with every write to its connection recorded."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        recorder = Recorder(transport)
        RECORDED.append(recorder)
        super().connection_made(recorder)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def recorded_gateway(
    redis_url: str, minter: TokenMinter
) -> AsyncIterator[tuple[Upstream, str]]:
    RECORDED.clear()
    async with running_upstream("one") as (service, upstream_url):
        settings = gateway_settings(redis_url, catalog_upstream=urls(upstream_url))
        app = create_app(settings, key_source=minter.key_source)
        async with serve(app, http=RecordingEdge) as base_url:
            yield service, base_url


async def test_a_proxied_answer_leaves_the_gateway_in_one_write(
    redis_url: str, minter: TokenMinter
) -> None:
    async with (
        recorded_gateway(redis_url, minter) as (_, base_url),
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        answers = [await http.get("/catalog/echo", params={"n": n}) for n in range(3)]
        head = await http.head("/catalog/echo")
        (connection,) = RECORDED  # one kept-alive connection

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert head.status_code == 200
    # one write per answer on the connection, each the whole answer, head and body
    assert len(connection.writes) == 4
    for write, answer in zip(connection.writes, answers, strict=False):
        assert write.startswith(b"HTTP/1.1 200 OK\r\n")
        assert write.endswith(answer.content)
    assert connection.writes[3].startswith(b"HTTP/1.1 200 OK\r\n")
    assert connection.writes[3].endswith(b"\r\n\r\n")  # HEAD: no body


async def test_a_streamed_answer_sends_its_head_before_the_rest_of_the_body(
    redis_url: str, minter: TokenMinter
) -> None:
    async with (
        recorded_gateway(redis_url, minter) as (upstream, base_url),
        httpx.AsyncClient(base_url=base_url) as http,
        http.stream(
            "GET",
            "/catalog/stream",
            params={"chunks": 2, "size": 10},
            headers={"Accept-Encoding": "identity"},
        ) as response,
    ):
        chunks = response.aiter_raw()
        first = await anext(chunks)  # came while the upstream still holds the rest
        upstream.release_stream.set()
        rest = b"".join([chunk async for chunk in chunks])

    assert response.status_code == 200
    assert first == b"a" * 10
    assert rest == b"b" * 10
    (connection,) = RECORDED
    assert connection.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"a" * 10 in connection.writes[0]  # the head with the first chunk


async def test_a_head_held_when_the_connection_is_lost_is_dropped() -> None:
    recorder, writes = head_first()
    writes.write(b"head")
    recorder.closed_after = 0  # lost under the held head
    await a_turn()
    assert recorder.writes == []
