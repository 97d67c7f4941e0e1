from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import pytest
from pydantic import AnyHttpUrl, RedisDsn

from gateway.config import Settings
from gateway.edge import EdgeHttpProtocol
from gateway.main import Gateway, create_app

from .upstreams import Upstream

if TYPE_CHECKING:
    from kit_testing import TokenMinter

pytest_plugins = ["kit_testing"]
# kit_testing is imported inside functions: a top-level import would load the
# plugin before pytest can rewrite its asserts


@pytest.fixture(scope="session")
def minter() -> TokenMinter:
    from kit_testing import TokenMinter

    return TokenMinter()


def urls(*bases: str) -> list[AnyHttpUrl]:
    return [AnyHttpUrl(base) for base in bases]


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused."""
    from kit_testing import free_port

    return f"http://127.0.0.1:{free_port()}"


def gateway_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": RedisDsn(redis_url),
        "log_level": "WARNING",
        "health_check_interval_seconds": 0,
        "rate_limit_enabled": False,
        "eject_seconds": 0.5,
        # the body limit has tests of its own; others stream large bodies
        "max_body_bytes": 64 * 1024 * 1024,
        "auth_upstream": urls(dead_url()),
        "catalog_upstream": urls(dead_url()),
        "chat_upstream": urls(dead_url()),
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_upstream(node: str, **options: Any) -> AsyncIterator[tuple[Upstream, str]]:
    from kit_testing import serve

    upstream = Upstream(node, **options)
    async with serve(upstream.app) as base_url:
        yield upstream, base_url


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, minter: TokenMinter
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    app = create_app(settings, key_source=minter.key_source)
    async with (
        serve_gateway(app) as base_url,
        httpx.AsyncClient(base_url=base_url) as client,
    ):
        yield app, client


def serve_gateway(app: Gateway, **uvicorn_options: Any) -> AbstractAsyncContextManager[str]:
    """The gateway served as its image runs it: the edge protocol (its guards
    and the direct path), no proxy headers read by uvicorn."""
    from kit_testing import serve

    options: dict[str, Any] = {"http": EdgeHttpProtocol, "proxy_headers": False}
    return serve(app, **{**options, **uvicorn_options})


@contextlib.asynccontextmanager
async def in_process_gateway(
    settings: Settings, minter: TokenMinter
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """The gateway driven through ASGITransport: no server in front of it that
    would read X-Forwarded-* itself; the client address is 127.0.0.1."""
    app = create_app(settings, key_source=minter.key_source)
    from kit_testing import started

    async with started(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://edge.test") as client:
            yield app, client


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    async with running_upstream("one") as running:
        yield running


@pytest.fixture
async def gateway(
    upstream: tuple[Upstream, str], redis_url: str, minter: TokenMinter
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway whose catalog and chat pools are the one upstream."""
    _, base_url = upstream
    settings = gateway_settings(
        redis_url, catalog_upstream=urls(base_url), chat_upstream=urls(base_url)
    )
    async with running_gateway(settings, minter) as running:
        yield running


@dataclass
class LateReplica:
    """A running gateway, and the port its one replica of a pool will listen on."""

    app: Gateway
    client: httpx.AsyncClient
    port: int

    def listen(self, upstream: Upstream) -> AbstractAsyncContextManager[str]:
        """The replica comes up: `upstream` served on its port."""
        from kit_testing import serve

        return serve(upstream.app, port=self.port)


class GatewayWithALateReplica(Protocol):
    def __call__(
        self, service: str, *, host: str = ...
    ) -> AbstractAsyncContextManager[LateReplica]: ...


@pytest.fixture
def gateway_with_a_late_replica(redis_url: str, minter: TokenMinter) -> GatewayWithALateReplica:
    """Starts a gateway whose `service` pool is one replica that does not
    listen yet, at 127.0.0.1 or at `host` (a name the test resolves), on a free
    port. The gateway looks at it again only a minute later (probes, DNS,
    ejection): a replica that comes up in between is found by a request alone."""
    from kit_testing import free_port

    @contextlib.asynccontextmanager
    async def start(service: str, *, host: str = "127.0.0.1") -> AsyncIterator[LateReplica]:
        port = free_port()
        settings = gateway_settings(
            redis_url,
            **{f"{service}_upstream": urls(f"http://{host}:{port}")},
            dns_refresh_seconds=60,
            health_check_interval_seconds=60,
            eject_seconds=60,
        )
        async with running_gateway(settings, minter) as (app, client):
            yield LateReplica(app, client, port)

    return start


@pytest.fixture
def clean_redis_url(redis_url: str) -> str:
    """A database of its own, emptied, for tests that count keys."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/1"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echoed["headers"] if key == name]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextlib.asynccontextmanager
async def raw_replica(handle: Handler) -> AsyncIterator[str]:
    """A replica that is a bare TCP server answering as `handle` says; every
    connection it holds is cut on the way out."""
    held: list[asyncio.StreamWriter] = []

    async def holding(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(holding, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def answering_status(status: bytes) -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that answers a request (its body read, if it has one) or an
    upgrade with `status` and a two-byte body, then waits for the gateway to
    close the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":", 1)[1]))
        writer.write(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nhi")
        await reader.read()  # the gateway keeps no connection that answered so

    return raw_replica(answer)


def upgrade_accepted(head: bytes, *, extra: bytes = b"") -> bytes:
    """The 101 answering the upgrade request `head` (with `extra` header lines)."""
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n"
    )
