"""The HTTP data path against real upstreams on loopback ports."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.headers import HeaderPolicy, reported_client, upstream_request
from gateway.main import Gateway
from kit_testing import TokenMinter

from .conftest import (
    answering_status,
    dead_url,
    gateway_settings,
    header_values,
    in_process_gateway,
    running_gateway,
    running_upstream,
    urls,
)
from .upstreams import Upstream

GatewayClient = tuple[Gateway, httpx.AsyncClient]


async def test_forwards_method_path_query_and_body_unchanged(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    response = await client.put("/catalog/echo?b=2&a=%20x", content=b"payload")
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/catalog/echo"
    assert echoed["query"] == "b=2&a=%20x"
    assert echoed["body"] == "payload"
    assert upstream[0].hits == 1


FORWARDED = "for=6.6.6.6;proto=https;host=shop.example"


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        # the client's own word is dropped: the gateway says where it came from
        (
            False,
            {
                "x-forwarded-for": ["127.0.0.1"],
                "x-forwarded-proto": ["http"],
                "x-forwarded-host": ["edge.test"],
                "forwarded": [],
            },
        ),
        # a proxy in front is believed, and the hop it came through added
        (
            True,
            {
                "x-forwarded-for": ["6.6.6.6, 127.0.0.1"],
                "x-forwarded-proto": ["https"],
                "x-forwarded-host": ["shop.example"],
                "forwarded": [FORWARDED],
            },
        ),
    ],
    ids=["untrusted", "trusted proxy in front"],
)
async def test_sets_forwarded_headers_and_passes_the_request_id(
    upstream: tuple[Upstream, str],
    redis_url: str,
    minter: TokenMinter,
    trusted: bool,
    expected: dict[str, list[str]],
) -> None:
    settings = gateway_settings(
        redis_url, catalog_upstream=urls(upstream[1]), trust_forwarded_headers=trusted
    )
    async with in_process_gateway(settings, minter) as (_, client):
        response = await client.get(
            "/catalog/echo",
            headers={
                "X-Request-ID": "req-123",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "shop.example",
                "Forwarded": FORWARDED,
            },
        )
    assert response.status_code == 200
    echoed = response.json()
    assert {name: header_values(echoed, name) for name in expected} == expected
    assert header_values(echoed, "host") == ["edge.test"]
    assert header_values(echoed, "x-request-id") == ["req-123"]
    assert response.headers["x-request-id"] == "req-123"
    assert float(response.headers["x-process-time"]) >= 0


@pytest.mark.parametrize(
    "policy",
    [
        HeaderPolicy.for_http(trust_forwarded=False),
        HeaderPolicy.for_websocket(trust_forwarded=False),
    ],
    ids=["http", "websocket"],
)
def test_a_client_cannot_say_where_it_came_from(policy: HeaderPolicy) -> None:
    scope = {
        "headers": [
            (b"host", b"edge.test"),
            (b"forwarded", b"for=6.6.6.6;proto=https"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
        ],
        "client": ("10.0.0.7", 40000),
        "scheme": "http",
    }
    outgoing = upstream_request(scope, policy, "req-1")
    assert [value for name, value in outgoing.headers if name.lower() == "forwarded"] == []
    assert ("X-Forwarded-For", "10.0.0.7") in outgoing.headers
    assert ("X-Forwarded-Proto", "http") in outgoing.headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-forwarded-for", b"198.51.100.7, 203.0.113.1")], "203.0.113.1"),
        # several headers are one list: the last entry of the last one
        (
            [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-for", b" 2001:db8::1 ")],
            "2001:db8::1",
        ),
        ([(b"x-forwarded-for", b"203.0.113.1, not-an-address")], None),
        ([(b"x-forwarded-for", b"")], None),
        ([(b"forwarded", b"for=203.0.113.1")], None),
    ],
)
def test_the_client_a_trusted_proxy_reports(
    headers: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    assert reported_client(headers) == expected


async def test_passes_redirects_and_head_requests_through(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    moved = await client.get("/catalog/moved")
    head = await client.head("/catalog/echo")
    assert moved.status_code == 307
    assert moved.headers["location"] == "/catalog/echo"
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert upstream[0].hits == 2


async def test_adds_no_headers_of_its_own_but_the_forwarding_ones(gateway: GatewayClient) -> None:
    _, client = gateway
    request = client.build_request("POST", "/catalog/echo", content=b"x")
    for name in ("accept", "accept-encoding", "user-agent"):
        del request.headers[name]
    response = await client.send(request)
    assert response.status_code == 200
    names = sorted(name for name, _ in response.json()["headers"])
    assert names == [
        "content-length",
        "host",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-request-id",
    ]
    assert "content-encoding" not in response.headers


async def test_strips_hop_by_hop_headers_both_ways(gateway: GatewayClient) -> None:
    _, client = gateway
    response = await client.get(
        "/catalog/echo",
        headers={
            "Connection": "keep-alive, x-client-secret",
            "X-Client-Secret": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-End-To-End": "kept",
        },
    )
    assert response.status_code == 200
    names = {name for name, _ in response.json()["headers"]}
    assert not names & {"x-client-secret", "keep-alive", "te", "proxy-authorization"}
    assert header_values(response.json(), "x-end-to-end") == ["kept"]

    response = await client.get("/catalog/hop")
    assert response.status_code == 200
    assert response.text == "ok"
    assert response.headers["x-end-to-end"] == "1"
    assert "x-hop-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert response.headers.get_list("server") == ["uvicorn"]


async def test_streams_a_large_request_body_as_it_arrives(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    service, _ = upstream
    chunk = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        expected.update(chunk)
        # the rest only once the upstream has the first chunk: nothing buffers it
        await asyncio.wait_for(service.first_chunk_seen.wait(), 5)
        for _ in range(127):
            expected.update(chunk)
            yield chunk

    response = await client.post("/catalog/upload", content=body())
    assert response.status_code == 200
    assert response.json() == {"bytes": 128 * len(chunk), "sha256": expected.hexdigest()}


async def test_relays_an_early_refusal_of_an_oversized_body(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("strict", max_body_bytes=1024) as (service, base_url):
        settings = gateway_settings(redis_url, catalog_upstream=urls(base_url))
        async with running_gateway(settings, minter) as (_, client):
            declared = await client.post("/catalog/upload", content=b"x" * (4 * 1024 * 1024))

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(64):
                    yield b"y" * 65536

            streamed = await client.post("/catalog/upload", content=chunks())
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"
    assert declared.json()["title"] == "Payload too large"
    # refused by the route once 1 KiB had arrived (this app has no problem handlers)
    assert streamed.status_code == 413
    assert streamed.text == "The request body exceeds 1024 bytes"
    assert service.hits == 1


async def test_streams_the_response_body_as_it_arrives(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    service, _ = upstream
    async with client.stream(
        "GET", "/catalog/stream?chunks=64&size=65536", headers={"Accept-Encoding": "identity"}
    ) as response:
        assert response.status_code == 200
        chunks = response.aiter_raw()
        first = await asyncio.wait_for(anext(chunks), 5)
        assert first
        assert set(first) == {ord("a")}
        # the first chunk arrived while the upstream still holds back the rest
        service.release_stream.set()
        received = len(first) + sum([len(chunk) async for chunk in chunks])
    assert received == 64 * 65536


async def test_a_client_leaving_mid_stream_releases_the_upstream(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    service, _ = upstream
    headers = {"Accept-Encoding": "identity"}
    async with client.stream("GET", "/catalog/stream?chunks=8", headers=headers) as response:
        assert response.status_code == 200
        first = await asyncio.wait_for(anext(response.aiter_raw()), 5)
        assert first == b"a" * 1024
    # the client hung up while the upstream was holding its stream open
    await asyncio.wait_for(service.stream_abandoned.wait(), 5)
    assert not service.release_stream.is_set()


async def test_compresses_for_clients_that_accept_gzip(gateway: GatewayClient) -> None:
    _, client = gateway
    response = await client.get("/catalog/echo", headers={"X-Padding": "p" * 4000})
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["path"] == "/catalog/echo"
    plain = await client.get("/catalog/echo", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    events = await client.get("/catalog/events", headers={"Accept-Encoding": "gzip"})
    assert events.status_code == 200
    assert "content-encoding" not in events.headers  # event streams are never buffered by gzip
    assert events.text.count("data: ") == 3


async def test_retries_an_idempotent_request_on_another_replica(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("live") as (service, live):
        settings = gateway_settings(redis_url, catalog_upstream=urls(dead_url(), live))
        async with running_gateway(settings, minter) as (_app, client):
            statuses = [(await client.get("/catalog/echo")).status_code for _ in range(4)]
            metrics = (await client.get("/metrics")).text
    assert statuses == [200, 200, 200, 200]
    assert service.hits == 4
    assert 'gateway_upstream_retries_total{route="catalog"} 1.0' in metrics


@pytest.mark.parametrize("streamed", [False, True], ids=["body", "streamed-body"])
async def test_a_post_whose_connection_never_opened_goes_to_another_replica(
    redis_url: str, minter: TokenMinter, streamed: bool
) -> None:
    """Nothing was sent, so even a POST is safe to send elsewhere: a replica
    that stopped listening (a rolling update) costs a login nothing. A body
    still streaming from the client was not read either."""

    def body() -> Any:
        if not streamed:
            return b"x" * 100_000

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 10_000

        return chunks()

    async with running_upstream("live") as (service, live):
        settings = gateway_settings(redis_url, catalog_upstream=urls(dead_url(), live))
        async with running_gateway(settings, minter) as (_, client):
            responses = [await client.post("/catalog/echo", content=body()) for _ in range(2)]
            metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["body"] for r in responses] == ["x" * 100_000] * 2
    assert service.hits == 2
    assert 'gateway_upstream_retries_total{route="catalog"} 1.0' in metrics


async def test_a_post_no_replica_takes_is_a_503_to_retry(
    redis_url: str, minter: TokenMinter
) -> None:
    settings = gateway_settings(redis_url, catalog_upstream=urls(dead_url(), dead_url()))
    async with running_gateway(settings, minter) as (_, client):
        failed = await client.post("/catalog/echo", content=b"x")
    # nothing was sent: "unavailable, retry", not "the service answered garbage"
    assert failed.status_code == 503
    assert failed.headers["content-type"] == "application/problem+json"
    assert failed.json()["detail"] == "No catalog replica is available"
    assert int(failed.headers["retry-after"]) >= 1
    assert failed.json()["instance"] == failed.headers["x-request-id"]


async def test_times_out_with_504(redis_url: str, minter: TokenMinter) -> None:
    async with running_upstream("slow") as (_, base_url):
        settings = gateway_settings(
            redis_url, catalog_upstream=urls(base_url), catalog_timeout_seconds=0.2
        )
        async with running_gateway(settings, minter) as (_, client):
            started = time.monotonic()
            response = await client.get("/catalog/slow?seconds=1")
            elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["title"] == "Gateway timeout"
    assert "0.2 s" in response.json()["detail"]
    assert elapsed < 0.9


async def test_answers_503_at_once_without_a_healthy_replica(
    redis_url: str, minter: TokenMinter
) -> None:
    settings = gateway_settings(
        redis_url, catalog_upstream=urls(dead_url()), health_check_interval_seconds=5
    )
    async with running_gateway(settings, minter) as (_, client):
        started = time.monotonic()
        response = await client.get("/catalog/echo")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["title"] == "Service unavailable"
    assert body["detail"] == "No catalog replica is available"
    assert body["instance"] == response.headers["x-request-id"]
    assert int(response.headers["retry-after"]) >= 1
    # at once: not after a connect timeout (2 s) or the next probe (5 s)
    assert elapsed < 1.0


@pytest.mark.parametrize("status", [b"000", b"099", b"101", b"600", b"999"])
async def test_an_answer_with_no_http_status_is_a_502_on_either_path(
    redis_url: str, minter: TokenMinter, status: bytes
) -> None:
    """A GET (the direct path) and a POST (the ASGI path) to a replica that
    answers with a status line no client can be given: a 502 problem, never
    a broken answer."""

    async with answering_status(status) as replica_url:
        settings = gateway_settings(redis_url, catalog_upstream=urls(replica_url))
        async with running_gateway(settings, minter) as (_, client):
            answers = [
                await client.get("/catalog/x"),
                await client.post("/catalog/x", content=b"body"),
            ]
    for response in answers:
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "The catalog service failed to answer"
