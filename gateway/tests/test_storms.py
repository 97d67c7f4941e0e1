"""Connection storms: upgrades served in turns, timeouts the gateway's own busy
loop caused are held against nobody, and sockets closed mid-flood end quietly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from starlette.types import Message
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.pool import Pool
from gateway.upstream import open_upstream
from gateway.websocket import HandshakeGate, Relay
from kit.errors import ServiceUnavailable
from kit_testing import TokenMinter

from .conftest import gateway_settings, raw_replica, running_gateway, running_upstream, urls
from .test_websocket import ws_url


def silent_upstream() -> contextlib.AbstractAsyncContextManager[str]:
    """A replica that takes the connection and never answers the upgrade."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the gateway gives up on it

    return raw_replica(handle)


async def test_upgrades_beyond_the_handshake_slots_wait_then_get_503(
    redis_url: str, minter: TokenMinter
) -> None:
    async with silent_upstream() as silent_url:
        settings = gateway_settings(
            redis_url,
            chat_upstream=urls(silent_url),
            chat_timeout_seconds=20,
            ws_handshakes_in_flight=1,
            ws_handshake_wait_seconds=0.5,
        )
        async with running_gateway(settings, minter) as (app, client):
            # the first upgrade holds the one slot, waiting on the silent replica
            first = asyncio.create_task(connect(ws_url(client, "/chat/ws/lobby")).__aenter__())
            deadline = time.monotonic() + 10
            while app.runtime.routes["chat"].pool.replicas[0].in_flight == 0:
                assert time.monotonic() < deadline, "the first upgrade never reached the replica"
                await asyncio.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(client, "/chat/ws/lobby")):
                    pass
            waited = time.monotonic() - started
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await first
    response = refused.value.response
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    problem = json.loads(response.body or b"{}")
    assert problem["detail"] == "Too many WebSocket handshakes at once; retry"
    assert waited >= 0.5  # it waited its turn before it was refused


async def test_an_upgrade_waiting_for_a_slot_goes_through_when_one_is_free(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("one") as (_, base_url):
        settings = gateway_settings(
            redis_url, chat_upstream=urls(base_url), ws_handshakes_in_flight=1
        )
        async with running_gateway(settings, minter) as (_, client):
            # eight at once through one slot: each waits its turn, none is refused
            sockets = await asyncio.gather(
                *(connect(ws_url(client, "/chat/ws/lobby")) for _ in range(8))
            )
            for socket in sockets:
                assert json.loads(await socket.recv())["node"] == "one"
                await socket.close()


async def test_the_gate_serves_waiters_in_arrival_order_and_passes_on_late_grants() -> None:
    gate = HandshakeGate(1, wait_seconds=5)
    order: list[int] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.slot():
            await release.wait()

    async def waiter(number: int) -> None:
        async with gate.slot():
            order.append(number)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(waiter(number)) for number in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert gate.waiting == 3
    # a waiter that gives up does not keep the slot from the next one
    waiters[1].cancel()
    release.set()
    await first
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [0, 2]
    assert gate.waiting == 0
    # every slot came back: the next one is taken at once
    async with asyncio.timeout(1), gate.slot():
        pass

    short = HandshakeGate(1, wait_seconds=0.05)
    async with short.slot():
        with pytest.raises(ServiceUnavailable):
            async with short.slot():
                pass
    async with asyncio.timeout(1), short.slot():
        pass


def test_timeouts_while_the_loop_ran_late_eject_no_replica() -> None:
    stalled = True
    pool = Pool(
        "chat",
        [("10.0.0.1", 8000), ("10.0.0.2", 8000), ("10.0.0.3", 8000)],
        eject_after_failures=2,
        eject_seconds=30,
        probing=False,
        stalled=lambda: stalled,
    )
    pool.update(pool.targets)
    replica = pool.replicas[0]
    for _ in range(5):
        pool.timed_out(replica)
    assert pool.states()["ejected"] == 0
    for _ in range(5):
        pool.probed(replica, ready=None, timed_out=True)
    assert replica.healthy
    # the same timeouts on a loop that keeps time are a verdict
    stalled = False
    pool.timed_out(replica)
    pool.timed_out(replica)
    assert pool.states()["ejected"] == 1


async def test_a_relay_whose_client_side_was_closed_by_the_server_ends_quietly() -> None:
    """uvicorn closes a socket itself when its client stops answering pings (a
    phone in a tunnel), and from then on refuses every send with RuntimeError,
    while the upstream's frames keep coming. The relay must end there rather
    than raise: the error ended the session with a traceback per socket."""
    async with running_upstream("one") as (service, base_url):
        host, port = base_url.removeprefix("http://").split(":")
        upstream = await open_upstream(
            host,
            int(port),
            b"/chat/ws/lobby",
            [("host", "chat")],
            subprotocols=[],
            max_size=1 << 20,
            connect_timeout=5,
        )
        await upstream.receive()  # ready
        await upstream.send_text("flood:50")
        sent: list[str] = []

        async def closed_by_the_server(message: Message) -> None:
            if sent:
                raise RuntimeError(
                    "Unexpected ASGI message 'websocket.send', after sending 'websocket.close'."
                )
            sent.append(message["text"])

        async def never() -> Message:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        relay = Relay(upstream, never, closed_by_the_server)
        await asyncio.wait_for(relay.upstream_to_client(), 10)
        assert sent == ["frame 0"]
        assert not relay.client_open
        await upstream.close()
    await asyncio.wait_for(service.ws_closed.wait(), 10)
