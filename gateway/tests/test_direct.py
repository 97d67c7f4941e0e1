"""The direct path (`gateway.direct`): a proxied request without a body is
answered from the edge protocol, and answered as the ASGI path answers it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.main import Gateway, create_app
from kit.context import request_id_var
from kit_testing import TokenMinter

from .conftest import gateway_settings, header_values, serve_gateway, urls
from .upstreams import Upstream

# what differs between two answers to the same request by design
_PER_ANSWER = frozenset({"date", "x-process-time"})


class Taken:
    """Counts the requests a gateway's direct path answered."""

    def __init__(self, app: Gateway) -> None:
        assert app.direct is not None
        self.count = 0
        run = app.direct.run

        async def counted(cycle: Any) -> None:
            self.count += 1
            await run(cycle)

        app.direct.run = counted  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def gateway_and_count(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Taken]]:
    app = create_app(gateway_settings(**overrides))
    taken = Taken(app)
    async with serve_gateway(app) as base, httpx.AsyncClient(base_url=base) as client:
        yield client, taken


@pytest.fixture
async def both_paths(
    upstream: tuple[Upstream, str], redis_url: str, minter: TokenMinter
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, Taken]]:
    """Two gateways in front of one upstream: one answers by the direct path
    where it can, the other by the ASGI path only."""
    settings = gateway_settings(
        redis_url, catalog_upstream=urls(upstream[1]), chat_upstream=urls(upstream[1])
    )
    direct = create_app(settings, key_source=minter.key_source)
    taken = Taken(direct)
    asgi = create_app(settings, key_source=minter.key_source)
    asgi.direct = None
    async with (
        serve_gateway(direct) as direct_base,
        serve_gateway(asgi) as asgi_base,
        httpx.AsyncClient(base_url=direct_base) as direct_client,
        httpx.AsyncClient(base_url=asgi_base) as asgi_client,
    ):
        yield direct_client, asgi_client, taken


def answer(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {name: value for name, value in response.headers.items() if name not in _PER_ANSWER}
    return response.status_code, headers, response.content


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/catalog/echo?q=1&q=2", {}),
        ("HEAD", "/catalog/echo", {}),
        ("DELETE", "/catalog/echo", {}),
        # above GZip's minimum size: compressed for a client that accepts it
        ("GET", "/catalog/echo", {"Accept-Encoding": "gzip", "X-Pad": "p" * 2000}),
        ("GET", "/catalog/echo", {"Accept-Encoding": "identity", "X-Pad": "p" * 2000}),
        # streamed in chunks of unknown length; event streams are never compressed
        ("GET", "/catalog/events", {"Accept-Encoding": "gzip"}),
        ("GET", "/catalog/stream?chunks=3&size=70000", {}),
        ("GET", "/catalog/stream?chunks=3&size=70000", {"Accept-Encoding": "gzip"}),
        # a body invited and none sent: no "100 Continue" inside the answer
        ("GET", "/catalog/stream?chunks=3&size=70000", {"Expect": "100-continue"}),
        ("GET", "/catalog/hop", {}),
        ("GET", "/catalog/moved", {}),
        # the gateway's request id and time replace the service's
        ("GET", "/catalog/ids", {}),
        ("GET", "/catalog/nowhere", {}),
        # refusals: the gateway's own problem+json
        ("GET", "/catalog/echo", {"Authorization": "Bearer not-a-token"}),
        ("GET", "/auth/users/me", {}),
        ("GET", "/catalog/echo", {"Authorization": "Basic a", "authorization": "Basic b"}),
    ],
)
async def test_both_paths_answer_alike(
    both_paths: tuple[httpx.AsyncClient, httpx.AsyncClient, Taken],
    upstream: tuple[Upstream, str],
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    direct_client, asgi_client, taken = both_paths
    upstream[0].release_stream.set()
    # one request id for both: it is echoed in the answer and seen by the upstream
    sent = {"Host": "edge.test", "X-Request-ID": "same-id", **headers}
    if "authorization" in sent:
        raw = [(name.encode(), value.encode()) for name, value in sent.items()]
        direct = await direct_client.request(method, path, headers=raw)
        asgi = await asgi_client.request(method, path, headers=raw)
    else:
        direct = await direct_client.request(method, path, headers=sent)
        asgi = await asgi_client.request(method, path, headers=sent)
    assert taken.count == 1
    assert answer(direct) == answer(asgi)
    assert direct.headers.get_list("x-request-id") == ["same-id"]
    [process_time] = direct.headers.get_list("x-process-time")
    assert 0 < float(process_time) < 9


async def test_a_new_request_id_for_a_client_without_a_usable_one(
    both_paths: tuple[httpx.AsyncClient, httpx.AsyncClient, Taken],
) -> None:
    direct_client, _, taken = both_paths
    first = await direct_client.get("/catalog/echo", headers={"X-Request-ID": "bad id\t!"})
    second = await direct_client.get("/catalog/echo")
    assert taken.count == 2
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert len(set(ids)) == 2
    assert all(len(value) == 32 for value in ids)
    assert header_values(first.json(), "x-request-id") == [ids[0]]


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    """`count` answers with a Content-Length each: (head, body)."""
    answers = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        answers.append((head, await reader.readexactly(length)))
    return answers


async def test_pipelined_requests_are_answered_in_order_either_way(
    both_paths: tuple[httpx.AsyncClient, httpx.AsyncClient, Taken],
) -> None:
    direct_client, _, taken = both_paths
    url = direct_client.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    requests = [
        b"GET /catalog/echo HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: one\r\n\r\n",
        # a body: the ASGI path's, between two of the direct path's
        (
            b"POST /catalog/echo HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: two\r\n"
            b"Content-Length: 4\r\n\r\nbody"
        ),
        b"GET /catalog/slow?seconds=0.2 HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: three\r\n\r\n",
        b"GET /catalog/echo?last HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: four\r\n\r\n",
    ]
    writer.write(b"".join(requests))
    try:
        answers = await read_answers(reader, 4)
    finally:
        writer.close()
    ids = [
        line.split(b":", 1)[1].strip()
        for head, _ in answers
        for line in head.split(b"\r\n")
        if line.startswith(b"x-request-id:")
    ]
    assert ids == [b"one", b"two", b"three", b"four"]
    assert all(head.startswith(b"HTTP/1.1 200 ") for head, _ in answers)
    assert b'"body":"body"' in answers[1][1]
    assert b'"query":"last"' in answers[3][1]
    assert taken.count == 3


async def test_a_request_that_does_not_stay_open_is_closed_after_its_answer(
    both_paths: tuple[httpx.AsyncClient, httpx.AsyncClient, Taken],
) -> None:
    direct_client, _, taken = both_paths
    url = direct_client.base_url
    for request in (
        b"GET /catalog/echo HTTP/1.0\r\nHost: edge.test\r\n\r\n",
        b"GET /catalog/echo HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(request)
        try:
            [(head, body)] = await read_answers(reader, 1)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close\r\n" in head
        assert b'"method":"GET"' in body
    assert taken.count == 2


async def test_what_the_direct_path_leaves_to_the_asgi_path(
    upstream: tuple[Upstream, str], redis_url: str
) -> None:
    overrides = {
        "redis_url": redis_url,
        "catalog_upstream": urls(upstream[1]),
        "cors_origins": ["https://shop.example"],
        "trusted_hosts": ["edge.test", "127.0.0.1"],
    }
    async with gateway_and_count(**overrides) as (client, taken):
        cors = await client.get("/catalog/echo", headers={"Origin": "https://shop.example"})
        assert cors.headers["access-control-allow-origin"] == "https://shop.example"
        foreign = await client.get("/catalog/echo", headers={"Host": "evil.example"})
        assert foreign.status_code == 400
        assert foreign.json()["type"].endswith("invalid-host")
        posted = await client.post("/catalog/echo", content=b"x")
        assert posted.json()["body"] == "x"
        own = await client.get("/healthz")
        assert own.status_code == 200
        assert taken.count == 0
        plain = await client.get("/catalog/echo", headers={"Host": "edge.test"})
        assert plain.status_code == 200
        assert taken.count == 1


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_the_access_log_line_of_a_direct_request(
    upstream: tuple[Upstream, str], redis_url: str, trusted: bool
) -> None:
    lines: list[tuple[dict[str, Any], str | None]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.fields, request_id_var.get()))  # type: ignore[attr-defined]

    collect = Collect()
    access = logging.getLogger("access")
    overrides = {
        "redis_url": redis_url,
        "catalog_upstream": urls(upstream[1]),
        "log_level": "INFO",
        "trust_forwarded_headers": trusted,
    }
    async with gateway_and_count(**overrides) as (client, taken):
        access.addHandler(collect)
        try:
            response = await client.get(
                "/catalog/echo?secret=1", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.1"}
            )
        finally:
            access.removeHandler(collect)
    assert taken.count == 1
    [(fields, request_id)] = lines
    client_address = "203.0.113.1" if trusted else "127.0.0.1"
    assert fields == {
        "method": "GET",
        "route": "/catalog",
        "path": "/catalog/echo",
        "status": 200,
        "duration_ms": fields["duration_ms"],
        "user_id": None,
        "client": client_address,
        "bytes": len(response.content),
    }
    assert fields["duration_ms"] > 0
    assert request_id == response.headers["x-request-id"]
    assert header_values(response.json(), "x-forwarded-for") == (
        ["203.0.113.1, 127.0.0.1"] if trusted else ["127.0.0.1"]
    )
