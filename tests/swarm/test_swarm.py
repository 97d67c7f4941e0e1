"""The system on a real single-node swarm, driven through its gateway: the
journey, secrets out of sight, a chat task killed, chat scaled to five and
rolled one replica at a time while messages flow. Tests run in this order
on one stack."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

import httpx
from websockets.asyncio.client import ClientConnection

from ..e2e.chat_client import (
    assert_complete,
    chat_clients,
    exchange,
)
from ..e2e.helpers import bearer, login, open_socket, receive_json, register
from .conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    IMPORT_KEY,
    IMPORTER,
    METRICS,
    OPTIONAL_SECRETS,
    Swarm,
    docker,
)


async def until_docker_says(
    predicate: Callable[[], bool], *, within: float, what: Callable[[], str] | str
) -> None:
    """Waits for a condition read from the engine: asked in a worker thread,
    twice a second, so the chat clients on this loop are never held up."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.5)  # the engine is asked again after a pause


async def until_the_gateway_reaches_every_chat_task(
    ws_url: str, http: httpx.AsyncClient, replicas: int, *, within: float = 90.0
) -> None:
    """Tasks start one by one and the gateway learns of each from DNS and its
    probes: wait until sockets opened through it land on all of them."""
    deadline = time.monotonic() + within
    seen: set[str] = set()
    while True:
        async with chat_clients(ws_url, http, 2 * replicas, room_prefix="warmup") as clients:
            seen = {c.node for c in clients}
        if len(seen) == replicas:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"sockets reached only {sorted(seen)} of {replicas} chat tasks")
        await asyncio.sleep(1.0)  # the gateway's next DNS and probe round


async def test_the_journey_through_the_swarm_gateway(
    swarm: Swarm, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    me = await client.get("/auth/users/me", headers=bearer(tokens["access_token"]))
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    name = "swarm lamp " + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
    created = await client.post(
        "/catalog/products", json={"name": name, "price": "19.90"}, headers=admin
    )
    found = await client.get("/catalog/products", params={"q": name})

    assert me.status_code == 200
    assert me.json()["email"] == user["email"]
    assert created.status_code == 201, created.text
    assert [item["id"] for item in found.json()["items"]] == [created.json()["id"]]

    await until_the_gateway_reaches_every_chat_task(swarm.ws_url, client, 3)
    async with chat_clients(swarm.ws_url, client, 6, room_prefix="swarm") as clients:
        sent: set[str] = set()
        await exchange(clients, "journey", range(3), sent)
        assert_complete(clients, sent)
        # the gateway spreads sockets over every replica, and they hear each other
        assert len({c.node for c in clients}) == 3


async def test_no_secret_is_in_a_service_spec(swarm: Swarm) -> None:
    inspected = docker("service", "inspect", *swarm.services())
    auth = json.loads(docker("service", "inspect", swarm.service("auth")))[0]
    environment = auth["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]

    assert len(swarm.secrets) == 7
    for name, value in swarm.secrets.items():
        assert len(value) >= 16, name
        assert value not in inspected, name
    assert "ADMIN_PASSWORD_FILE=/run/secrets/admin-password" in environment
    assert "SIGNING_KEY_FILE=/run/secrets/signing-key" in environment
    assert not [
        line for line in environment if line.startswith(("ADMIN_PASSWORD=", "SIGNING_KEY="))
    ]


async def test_settings_given_as_secrets_are_read_from_their_files(
    swarm: Swarm, client: httpx.AsyncClient
) -> None:
    inspected = docker("service", "inspect", *swarm.services())
    specs = {
        name: json.loads(docker("service", "inspect", swarm.service(name)))[0]["Spec"]
        for name in ("auth", "catalog", "gateway")
    }
    environments = {
        name: spec["TaskTemplate"]["ContainerSpec"]["Env"] for name, spec in specs.items()
    }
    secret_values = ("METRICS_PASSWORD", "CATALOG_API_KEY", "OAUTH_CLIENTS")

    for name in secret_values:
        assert OPTIONAL_SECRETS[name] not in inspected, name
    assert IMPORTER[1] not in inspected
    assert "METRICS_PASSWORD_FILE=/run/secrets/metrics-password" in environments["gateway"]
    assert "CATALOG_API_KEY_FILE=/run/secrets/catalog-api-key" in environments["catalog"]
    assert "OAUTH_CLIENTS_FILE=/run/secrets/oauth-clients" in environments["auth"]

    # and each one works from its file
    anonymous = await client.get("/metrics")
    scraped = await client.get("/metrics", auth=METRICS)
    name = "swarm import " + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
    imported = await client.post(
        "/catalog/products:import",
        headers={"X-API-Key": IMPORT_KEY},
        json=[{"name": name, "price": "3.50"}],
    )
    discovery = (await client.get("/auth/.well-known/openid-configuration")).json()
    token = await client.post(
        discovery["token_endpoint"],
        data={"grant_type": "client_credentials", "scope": "catalog:import"},
        auth=IMPORTER,
    )

    assert anonymous.status_code == 401
    assert scraped.status_code == 200
    assert imported.status_code == 201, imported.text
    assert token.status_code == 200, token.text
    assert token.json()["scope"] == "catalog:import"


async def test_a_killed_chat_task_is_replaced_and_nothing_is_lost(
    swarm: Swarm, client: httpx.AsyncClient
) -> None:
    async with chat_clients(swarm.ws_url, client, 6, room_prefix="swarm") as clients:
        sent: set[str] = set()
        await exchange(clients, "kill", range(2), sent)
        victim = clients[0].node
        container = next(c for c in swarm.containers("chat") if c.startswith(victim))

        await asyncio.to_thread(docker, "kill", container)
        await exchange(clients, "kill", range(2, 5), sent)
        # the replacement's container runs: right after the kill, `service ps`
        # can still list the killed task as running while its container is gone
        await until_docker_says(
            lambda: (
                len(swarm.running_tasks("chat")) == 3
                and len(running := swarm.containers("chat")) == 3
                and container not in running
            ),
            within=60,
            what="the swarm to replace the killed task",
        )
        await exchange(clients, "kill", range(5, 7), sent)

        assert_complete(clients, sent)
        moved = [c for c in clients if c.nodes[0] == victim]
        assert moved
        assert all(c.node != victim and c.close_codes for c in moved)


async def test_scaled_to_five_the_gateway_uses_every_replica_within_10_seconds(
    swarm: Swarm, client: httpx.AsyncClient
) -> None:
    before = {container[:12] for container in swarm.containers("chat")}
    await asyncio.to_thread(
        docker, "service", "scale", "--detach=false", f"{swarm.service('chat')}=5", timeout=300
    )
    scaled = time.monotonic()
    print(swarm.service_ls())  # noqa: T201 - `docker service ls` after scaling, for the record

    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    sockets: list[ClientConnection] = []
    seen: set[str] = set()
    try:
        while len(seen) < 5:
            assert time.monotonic() - scaled < 10, f"only {sorted(seen)} within 10 s"
            socket = await open_socket(swarm.ws_url, "scale-probe", token)
            sockets.append(socket)
            seen.add((await receive_json(socket))["node"])
    finally:
        await asyncio.gather(*(socket.close() for socket in sockets), return_exceptions=True)

    assert len(swarm.running_tasks("chat")) == 5
    assert seen == {container[:12] for container in swarm.containers("chat")}
    assert len(seen - before) == 2


async def test_a_rolling_update_of_chat_loses_no_message(
    swarm: Swarm, client: httpx.AsyncClient
) -> None:
    old = set(swarm.containers("chat"))
    async with chat_clients(swarm.ws_url, client, 6, room_prefix="swarm") as clients:
        sent: set[str] = set()
        await exchange(clients, "roll", range(2), sent)

        update = asyncio.create_task(
            asyncio.to_thread(
                docker, "service", "update", "--force", "--detach=false",
                swarm.service("chat"), timeout=600,
            )
        )  # fmt: skip
        number = 2
        while not update.done():
            await exchange(clients, "roll", range(number, number + 1), sent)
            number += 1
        await update
        await exchange(clients, "roll", range(number, number + 2), sent)

        assert_complete(clients, sent)
        # every replica was replaced, one at a time, and their sockets moved on
        assert not old & set(swarm.containers("chat"))
        assert len(swarm.running_tasks("chat")) == 5
        assert all(c.close_codes and 1012 in c.close_codes for c in clients)
        assert number > 5
    # the update is complete once its last task passed the monitoring period
    await until_docker_says(
        lambda: update_state(swarm, "chat") == "completed",
        within=60,
        what=lambda: f"the update to complete: {update_state(swarm, 'chat')}",
    )


def update_state(swarm: Swarm, service: str) -> str:
    spec = json.loads(docker("service", "inspect", swarm.service(service)))[0]
    state: str = spec["UpdateStatus"]["State"]
    return state
