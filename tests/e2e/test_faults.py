"""Faults on the running stack; after each, nothing accepted is lost.

Each test breaks one thing (a replica killed, Redis or PostgreSQL restarted,
a catalog replica stopped, chat scaled down and up) while clients keep
working through the gateway, then checks message ids and rows."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections import Counter

import httpx

from .chat_client import (
    ROUND_SECONDS,
    ChatClient,
    assert_complete,
    chat_clients,
    exchange,
    wait_until,
)
from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Stack
from .helpers import bearer, login, open_socket, receive_json, register


async def test_killed_chat_replica_loses_nothing(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    async with chat_clients(healthy_stack.ws_url, client, 6, room_prefix="fault") as clients:
        assert len({c.node for c in clients}) >= 2
        sent: set[str] = set()
        await exchange(clients, "kill", range(3), sent)

        victim = clients[0].node
        await asyncio.to_thread(_docker, "kill", victim)
        await exchange(clients, "kill", range(3, 6), sent)

        assert_complete(clients, sent)
        moved = [c for c in clients if c.nodes[0] == victim]
        assert moved
        assert all(c.node != victim and c.close_codes for c in moved)


STORM_USERS = 6
STORM_ROOMS = 4
STORM_SOCKETS = 96  # 16 a user (the default limit is 20), 24 a room


async def test_reconnect_storm_after_a_killed_replica_loses_nothing(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    """A third of the sockets lose their replica at once and come back together,
    with backoff and jitter, through the gateway; each resumes with `since`."""
    tokens = []
    for _ in range(STORM_USERS):
        user = await register(client)
        tokens.append((await login(client, user["email"], user["password"]))["access_token"])
    rooms = [f"storm-{_letters()}-{n}" for n in range(STORM_ROOMS)]
    clients = [
        ChatClient(healthy_stack.ws_url, rooms[n % STORM_ROOMS], tokens[n % STORM_USERS], f"s{n}")
        for n in range(STORM_SOCKETS)
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    readers = [asyncio.create_task(c.run()) for c in clients]
    sent: dict[str, set[str]] = {room: set() for room in rooms}

    async def one_round(tag: str, avoid: str) -> None:
        for room in rooms:
            sender = next(c for c in clients if c.room == room and c.node != avoid)
            text = f"{tag}-{room}"
            sent[room].add(text)
            await sender.send(text)
        await wait_until(
            lambda: all(sent[c.room] <= {m["text"] for m in c.messages} for c in clients),
            within=ROUND_SECONDS,
            what=f"round {tag} delivered to every socket",
        )

    try:
        counts = Counter(c.node for c in clients)
        victim = counts.most_common(1)[0][0]
        await one_round("before", "")
        await asyncio.to_thread(_docker, "kill", victim)
        for number in range(3):
            await one_round(f"after{number}", victim)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    moved = [c for c in clients if c.nodes[0] == victim]
    assert len(moved) == counts[victim]
    assert len(moved) >= STORM_SOCKETS // 4  # the storm: a third of them, give or take
    assert all(c.node != victim for c in moved)
    for c in clients:
        assert_complete([c], sent[c.room])


async def test_redis_restart_loses_no_message(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    async with chat_clients(healthy_stack.ws_url, client, 4, room_prefix="fault") as clients:
        sent: set[str] = set()
        await exchange(clients, "redis", range(2), sent)

        restart = asyncio.create_task(
            asyncio.to_thread(healthy_stack.compose_cmd, "restart", "redis")
        )
        await exchange(clients, "redis", range(2, 6), sent)
        await restart
        await exchange(clients, "redis", range(6, 8), sent)

        assert_complete(clients, sent)


async def test_postgres_restart_every_service_recovers(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    before = await client.post(
        "/catalog/products", json={"name": f"Before {_letters()}", "price": "5"}, headers=admin
    )
    assert before.status_code == 201

    await asyncio.to_thread(healthy_stack.compose_cmd, "restart", "postgres")
    restarted = time.monotonic()

    probes = {
        "auth": ("/auth/users/me", bearer(token)),
        "catalog": (f"/catalog/products/{before.json()['id']}", {}),
        "chat": ("/chat/rooms/lobby/messages", bearer(token)),
    }
    for name, (path, headers) in probes.items():
        await wait_until_ok(client, path, headers, what=name)
    assert time.monotonic() - restarted < 30

    # a write retried with its idempotency key lands exactly once
    key = uuid.uuid4().hex
    name = f"After {_letters()}"
    created = await post_until_created(client, admin, key, {"name": name, "price": "7.5"})
    # the replay may reach the other catalog replica, whose pool may still hold a
    # connection from before the restart: that costs a 503 and a retry, nothing more
    again = await post_until_created(client, admin, key, {"name": name, "price": "7.5"})
    assert again["id"] == created["id"]
    listed = await wait_until_ok(client, f"/catalog/products?q={name}", {}, what="list")
    assert [item["id"] for item in listed.json()["items"]] == [created["id"]]
    for product_id in (before.json()["id"], created["id"]):
        assert (await client.get(f"/catalog/products/{product_id}")).status_code == 200


async def wait_until_ok(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], *, what: str
) -> httpx.Response:
    """GETs `path` until it answers 200; only 502/503/504 may come meanwhile."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.TransportError):
            response = await client.get(path, headers=headers)
            if response.status_code == 200:
                return response
            assert response.status_code in (502, 503, 504), (what, response.text)
        assert time.monotonic() < deadline, f"{what} did not recover within 30 s"
        await asyncio.sleep(0.25)  # retry interval while the database comes back


async def post_until_created(
    client: httpx.AsyncClient, headers: dict[str, str], key: str, body: dict[str, str]
) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while True:
        response = await client.post(
            "/catalog/products", json=body, headers={**headers, "Idempotency-Key": key}
        )
        if response.status_code == 201:
            created: dict[str, str] = response.json()
            return created
        assert response.status_code in (502, 503, 504), response.text
        assert time.monotonic() < deadline
        await asyncio.sleep(0.25)  # retry interval while the database comes back


async def test_stopped_catalog_replica_is_routed_around(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    replicas = healthy_stack.containers("catalog")
    assert len(replicas) == 2
    await asyncio.to_thread(_docker, "stop", replicas[0]["ID"])

    statuses = [(await client.get("/catalog/products")).status_code for _ in range(30)]

    assert statuses == [200] * 30


# A replica frozen (paused: it takes connections and answers nothing). The
# gateway may take this long to stop sending it requests: three probes in a
# row timing out (every HEALTH_CHECK_INTERVAL_SECONDS, 5 s, each waiting
# 2 s), from wherever its probe cycle stood.
OUT_OF_ROTATION_WITHIN = 25.0
FROZEN_REPLICA_SECONDS = 35.0


async def test_frozen_catalog_replica_is_taken_out_of_rotation_and_back(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    """A request that reaches the frozen replica waits out the route's timeout
    (504); within a few probes the gateway sends none there, and once it
    answers again a probe takes it back."""
    replicas = healthy_stack.containers("catalog")
    assert len(replicas) == 2
    frozen = replicas[0]["ID"]
    answers: list[tuple[float, int]] = []

    async def browse(until: float, started: float) -> None:
        async with httpx.AsyncClient(base_url=healthy_stack.base_url, timeout=20) as http:
            while time.monotonic() < until:
                sent = time.monotonic()
                response = await http.get("/catalog/products?limit=5")
                answers.append((sent - started, response.status_code))
                await asyncio.sleep(0.25)  # a browsing client's pace

    await asyncio.to_thread(_docker, "pause", frozen)
    started = time.monotonic()
    try:
        await asyncio.gather(*(browse(started + FROZEN_REPLICA_SECONDS, started) for _ in range(4)))
    finally:
        await asyncio.to_thread(_docker, "unpause", frozen)
    taken_back = await wait_for_metric(
        client, 'gateway_upstream_replicas{route="catalog",state="available"} 2.0'
    )
    # Docker marks a paused container unhealthy; the stack is left as found
    deadline = time.monotonic() + 30
    while any(c.get("Health") != "healthy" for c in healthy_stack.containers("catalog")):
        assert time.monotonic() < deadline, "the unfrozen replica is not healthy again"
        await asyncio.sleep(0.5)  # compose reports health at the check's interval

    assert {status for _, status in answers} <= {200, 504}
    late = [status for at, status in answers if at >= OUT_OF_ROTATION_WITHIN]
    assert late
    assert late == [200] * len(late), sorted(answers)
    assert taken_back


async def wait_for_metric(client: httpx.AsyncClient, line: str, within: float = 30) -> bool:
    """Whether a scrape of the gateway's /metrics shows `line` within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if line in (await client.get("/metrics")).text:
            return True
        await asyncio.sleep(0.5)  # the next probe cycle
    return False


async def test_chat_scaled_down_then_up(healthy_stack: Stack, client: httpx.AsyncClient) -> None:
    async with chat_clients(healthy_stack.ws_url, client, 6, room_prefix="fault") as clients:
        old_nodes = {c.node for c in clients}
        assert len(old_nodes) == 3
        sent: set[str] = set()
        await exchange(clients, "scale", range(2), sent)

        await asyncio.to_thread(
            healthy_stack.compose_cmd, "up", "--detach", "--no-deps", "--scale", "chat=1", "chat"
        )
        await exchange(clients, "scale", range(2, 4), sent)
        survivors = {c.node for c in clients}
        assert len(survivors) == 1
        moved = [c for c in clients if c.nodes[0] not in survivors]
        assert moved
        assert all(1012 in c.close_codes for c in moved), [c.close_codes for c in moved]
        assert_complete(clients, sent)

        await asyncio.to_thread(
            healthy_stack.compose_cmd,
            "up",
            "--detach",
            "--wait",
            "--no-deps",
            "--scale",
            "chat=3",
            "chat",
        )
        scaled = time.monotonic()
        user = await register(client)
        token = (await login(client, user["email"], user["password"]))["access_token"]
        new_node = None
        while new_node is None:
            socket = await open_socket(healthy_stack.ws_url, "scale-probe", token)
            node = (await receive_json(socket))["node"]
            await socket.close()
            if node not in survivors:
                new_node = node
            assert time.monotonic() - scaled < 10, "no connection reached a new replica"


def _docker(*args: str) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True)


def _letters() -> str:
    return "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
