"""WebSocket proxying: frames, subprotocols, close codes, refusals, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.main import Gateway
from kit.websocket import WebSocketProtocol
from kit_testing import TokenMinter, serve

from .conftest import (
    GatewayWithALateReplica,
    answering_status,
    eventually,
    gateway_settings,
    raw_replica,
    running_gateway,
    running_upstream,
    upgrade_accepted,
    urls,
)
from .upstreams import Upstream

GatewayClient = tuple[Gateway, httpx.AsyncClient]


def ws_url(client: httpx.AsyncClient, path: str) -> str:
    return str(client.base_url).replace("http://", "ws://") + path


async def test_relays_frames_both_ways_with_the_bearer_header(
    gateway: GatewayClient, minter: TokenMinter
) -> None:
    _, client = gateway
    token = minter.token()
    async with connect(
        ws_url(client, "/chat/ws/lobby?since=4"),
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as socket:
        ready = json.loads(await socket.recv())
        assert ready == {
            "type": "ready",
            "node": "one",
            "authorization": f"Bearer {token}",
            "query": "since=4",
        }
        await socket.send("hello")
        assert await socket.recv() == "echo:hello"
        await socket.send(b"\x00\x01")
        assert await socket.recv() == b"echo:\x00\x01"
        assert socket.response is not None
        assert socket.response.headers["x-request-id"]


async def test_answers_with_the_subprotocol_the_upstream_chose(
    gateway: GatewayClient, minter: TokenMinter
) -> None:
    _, client = gateway
    token = minter.token()
    async with connect(
        ws_url(client, "/chat/ws/lobby"),
        subprotocols=["bearer", token],  # type: ignore[list-item]
    ) as socket:
        assert socket.subprotocol == "bearer"
        assert json.loads(await socket.recv())["type"] == "ready"


async def test_passes_the_upstream_close_code_to_the_client(gateway: GatewayClient) -> None:
    _, client = gateway
    async with connect(ws_url(client, "/chat/ws/lobby")) as socket:
        await socket.recv()
        await socket.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            await socket.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001
    assert closed.value.rcvd.reason == "bye"


async def test_passes_the_client_close_code_to_the_upstream(
    gateway: GatewayClient, upstream: tuple[Upstream, str]
) -> None:
    _, client = gateway
    service, _ = upstream
    async with connect(ws_url(client, "/chat/ws/lobby")) as socket:
        await socket.recv()
        await socket.close(code=4000, reason="leaving")
    await asyncio.wait_for(service.ws_closed.wait(), 5)
    assert service.ws_closed_with == 4000


async def test_refuses_the_upgrade_for_an_invalid_token(
    gateway: GatewayClient, upstream: tuple[Upstream, str], minter: TokenMinter
) -> None:
    _, client = gateway
    service, _ = upstream
    expired = minter.token(lifetime=-60)
    for offered in (
        {"additional_headers": {"Authorization": "Bearer not-a-token"}},
        {"subprotocols": ["bearer", expired]},
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(client, "/chat/ws/lobby"), **offered):
                pass
        assert refused.value.response.status_code == 401
        problem = json.loads(refused.value.response.body or b"{}")
        assert problem["title"] == "Not authenticated"
    assert service.ws_connects == 0


async def test_closes_client_sockets_with_1012_when_the_gateway_stops(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("one") as (service, base_url):
        settings = gateway_settings(redis_url, chat_upstream=urls(base_url))
        async with running_gateway(settings, minter) as (_, client):
            socket = await connect(ws_url(client, "/chat/ws/lobby"))
            await socket.recv()
        # the gateway has stopped
        with pytest.raises(ConnectionClosed) as closed:
            await socket.recv()
        await socket.close()
        await asyncio.wait_for(service.ws_closed.wait(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1012


async def test_a_replica_that_refused_the_last_probe_takes_the_upgrade_once_it_listens(
    gateway_with_a_late_replica: GatewayWithALateReplica,
) -> None:
    async with gateway_with_a_late_replica("chat") as late:
        assert late.app.runtime.routes["chat"].pool.states()["down"] == 1
        async with (
            late.listen(Upstream("late")),
            connect(ws_url(late.client, "/chat/ws/lobby")) as socket,
        ):
            ready = json.loads(await socket.recv())
    assert ready["node"] == "late"


async def test_refuses_the_upgrade_with_503_without_a_replica(
    redis_url: str, minter: TokenMinter
) -> None:
    settings = gateway_settings(redis_url, health_check_interval_seconds=5)
    async with running_gateway(settings, minter) as (_, client):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(client, "/chat/ws/lobby")):
                pass
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body or b"{}")["detail"] == (
        "No chat replica is available"
    )


def vanishing_upstream() -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that completes each upgrade, then drops the connection without
    a close frame, as a killed process does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(upgrade_accepted(await reader.readuntil(b"\r\n\r\n")))
        await writer.drain()
        writer.close()

    return raw_replica(handle)


async def test_a_replica_that_vanishes_is_out_for_the_sockets_that_reconnect(
    redis_url: str, minter: TokenMinter
) -> None:
    async with vanishing_upstream() as gone_url, running_upstream("one") as (_, base_url):
        settings = gateway_settings(
            redis_url,
            chat_upstream=urls(gone_url, base_url),
            eject_after_failures=1,
            eject_seconds=30,
        )
        async with running_gateway(settings, minter) as (app, client):
            kept = []
            lost_with: list[int | None] = []
            # each socket stays open: the next goes to the replica with fewer
            # in flight, so the vanishing one is chosen within two
            for _ in range(5):
                socket = await connect(ws_url(client, "/chat/ws/lobby"))
                try:
                    ready = json.loads(await socket.recv())
                except ConnectionClosed:
                    # 1014, bad gateway: the upstream vanished
                    lost_with.append(socket.close_code)
                    continue
                assert ready["node"] == "one"
                kept.append(socket)
            # the first loss took it out: every later socket went to the live replica
            assert lost_with == [1014]
            assert len(kept) == 4
            assert app.runtime.routes["chat"].pool.states()["ejected"] == 1
            for socket in kept:
                await socket.close()


def hanging_up_upstream() -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that reads each upgrade request and hangs up without an
    answer, as one stopping does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"upgrade: websocket" in head.lower():
            writer.transport.abort()
            return
        # its readiness probes pass: it is chosen like any other
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return raw_replica(handle)


async def test_an_upgrade_a_replica_hung_up_on_goes_to_another(
    redis_url: str, minter: TokenMinter
) -> None:
    """No socket opened on the replica that hung up: the upgrade is safe to
    send elsewhere, and the client gets its socket."""
    async with hanging_up_upstream() as stopping, running_upstream("one") as (_, live):
        settings = gateway_settings(redis_url, chat_upstream=urls(stopping, live), eject_seconds=60)
        async with running_gateway(settings, minter) as (_, client):
            nodes = []
            for _ in range(4):
                async with connect(ws_url(client, "/chat/ws/lobby")) as socket:
                    nodes.append(json.loads(await socket.recv())["node"])
            metrics = (await client.get("/metrics")).text
    retried = re.search(r'gateway_upstream_retries_total\{route="chat"\} (\S+)', metrics)
    assert nodes == ["one"] * 4
    # the replica that hung up was tried, and the upgrade went on
    assert retried is not None
    assert float(retried.group(1)) >= 1


def dropping_upstream(dropped: asyncio.Event) -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that floods each socket, then cuts it, as chat drops a slow
    consumer whose close frame could not get through."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"upgrade: websocket" not in head.lower():
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        writer.write(upgrade_accepted(head))
        frame = b"\x82\x7e" + (60000).to_bytes(2, "big") + bytes(60000)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                while True:  # until the gateway reads no more
                    writer.write(frame)
                    await writer.drain()
        writer.transport.abort()
        dropped.set()

    return raw_replica(handle)


async def test_a_socket_a_replica_dropped_while_its_client_read_slowly_ejects_nothing(
    redis_url: str, minter: TokenMinter
) -> None:
    """A client that reads nothing gets its socket dropped by the replica; the
    gateway, behind on that socket, does not take the cut for the replica
    dying: no client can eject a live replica this way."""
    dropped = asyncio.Event()
    async with dropping_upstream(dropped) as one, dropping_upstream(dropped) as other:
        settings = gateway_settings(
            redis_url, chat_upstream=urls(one, other), eject_after_failures=1, eject_seconds=60
        )
        async with running_gateway(settings, minter) as (app, client):
            pool = app.runtime.routes["chat"].pool
            async with connect(ws_url(client, "/chat/ws/lobby"), max_queue=1) as socket:
                await asyncio.wait_for(dropped.wait(), 10)
                with contextlib.suppress(ConnectionClosed):
                    while True:  # reads again: what was relayed, then the close
                        await asyncio.wait_for(socket.recv(), 10)
            states = pool.states()
    assert states["ejected"] == 0
    assert states["available"] == 2


def deaf_upstream() -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that completes each upgrade, then reads nothing more and
    never closes: as a replica that dropped the socket, its own close waiting
    behind what the gateway has not read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(upgrade_accepted(await reader.readuntil(b"\r\n\r\n")))
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()

    return raw_replica(handle)


async def test_a_relay_to_a_replica_that_reads_nothing_ends_when_its_client_leaves(
    redis_url: str, minter: TokenMinter
) -> None:
    """The client sends to a replica that reads no more, then goes: the relay
    ends within the route's timeout and the grace, the replica's count of
    sockets in flight comes back, and the replica is not held sick for it."""
    async with deaf_upstream() as url:
        settings = gateway_settings(redis_url, chat_upstream=urls(url), chat_timeout_seconds=1)
        async with running_gateway(settings, minter) as (app, client):
            pool = app.runtime.routes["chat"].pool
            socket = await connect(ws_url(client, "/chat/ws/lobby"), write_limit=2**16)
            (replica,) = pool.replicas
            assert replica.in_flight == 1
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                for _ in range(1000):  # until the buffers on the way are full
                    await asyncio.wait_for(socket.send("x" * 65536), 0.5)
            socket.transport.abort()

            async def relay_ended() -> bool:
                return replica.in_flight == 0

            await eventually(relay_ended, within=15)
            states = pool.states()
    assert states["available"] == 1


async def refusing_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """A replica that refuses every upgrade: `/chat/ws/<status>` answers that status."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    status = int(scope["path"].rsplit("/", 1)[1])
    await receive()
    if status == 403:
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.http.response.start", "status": status, "headers": []})
    await send({"type": "websocket.http.response.body", "body": b"no"})


@pytest.mark.parametrize(("refused", "answered"), [(403, 403), (404, 404), (500, 502)])
async def test_a_refused_upgrade_is_answered_before_the_socket_opens(
    redis_url: str, minter: TokenMinter, refused: int, answered: int
) -> None:
    async with serve(refusing_upstream, lifespan="off") as base_url:
        settings = gateway_settings(redis_url, chat_upstream=urls(base_url))
        async with running_gateway(settings, minter) as (_, client):
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(ws_url(client, f"/chat/ws/{refused}")):
                    pass
    assert refusal.value.response.status_code == answered


@pytest.mark.parametrize("status", [b"099", b"600", b"999"])
async def test_an_upgrade_answered_with_no_http_status_is_a_502(
    redis_url: str, minter: TokenMinter, status: bytes
) -> None:
    async with answering_status(status) as replica_url:
        settings = gateway_settings(redis_url, chat_upstream=urls(replica_url))
        async with running_gateway(settings, minter) as (_, client):
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(ws_url(client, "/chat/ws/lobby")):
                    pass
    response = refusal.value.response
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_socket_for_an_untrusted_host_is_refused_before_the_upstream(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("one") as (service, base_url):
        settings = gateway_settings(
            redis_url, chat_upstream=urls(base_url), trusted_hosts=["api.example"]
        )
        async with running_gateway(settings, minter) as (_, client):
            port = client.base_url.port
            # the Host is the URL's; the connection goes to the gateway on loopback
            with pytest.raises(InvalidStatus) as refused:
                async with connect(
                    f"ws://evil.example:{port}/chat/ws/lobby", host="127.0.0.1", port=port
                ):
                    pass
            async with connect(
                f"ws://api.example:{port}/chat/ws/lobby", host="127.0.0.1", port=port
            ) as socket:
                assert json.loads(await socket.recv())["type"] == "ready"
    assert refused.value.response.status_code == 403
    assert service.ws_connects == 1


async def test_a_relayed_socket_keeps_none_of_the_clients_headers(
    gateway: GatewayClient, minter: TokenMinter
) -> None:
    _, client = gateway
    token = minter.token()
    async with connect(
        ws_url(client, "/chat/ws/held"), additional_headers={"Authorization": f"Bearer {token}"}
    ) as socket:
        ready = json.loads(await socket.recv())
        await socket.send("still relayed")
        assert await socket.recv() == "echo:still relayed"
        # the server side of the client's socket: its scope holds no header (the
        # bearer token among them) while the relay runs
        (held,) = [
            protocol
            for protocol in gc.get_objects()
            if issubclass(type(protocol), WebSocketProtocol)  # not a weak proxy's referent
            and protocol.server == ("127.0.0.1", client.base_url.port)
            and getattr(protocol, "scope", {}).get("path") == "/chat/ws/held"
        ]
        assert held.scope["headers"] == []
    assert ready["authorization"] == f"Bearer {token}"  # the upstream had it


def test_the_upgrade_carries_the_gateways_trace_context_in_place_of_the_clients() -> None:
    from gateway.spans import with_trace_context

    client = [("host", "edge"), ("traceparent", "00-client-01"), ("authorization", "Bearer t")]
    ours = [("traceparent", "00-gateway-01")]
    assert with_trace_context(client, ours) == [
        ("host", "edge"),
        ("authorization", "Bearer t"),
        ("traceparent", "00-gateway-01"),
    ]
    assert with_trace_context(client, []) == client  # tracing off: passed through
