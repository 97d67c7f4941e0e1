"""Each attack on the stack, as a hostile client would try it through the
gateway, and what it gets now: a clear refusal for the attacker, and the
service still there for everyone else."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .conftest import IMPORT_KEY, Stack
from .helpers import bearer, login, open_socket, receive_json, register

PROBLEM = "application/problem+json"
# the gateway's defaults, which the end-to-end stack keeps
HEADER_TIMEOUT_SECONDS = 10.0
LOGIN_FAILURES_PER_ACCOUNT_AND_CLIENT = 5
MAX_SOCKETS_PER_USER = 20
SEND_BURST = 40
SEND_RATE_PER_SECOND = 20.0


def nul_cursor() -> str:
    raw = json.dumps(["created_at", "2026-01-01T00:00:00+00:00\u0000", str(uuid.uuid4())])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


async def test_a_nul_flood_never_takes_the_catalog_away(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    attacks = [{"q": "\x00"}, {"tag": "\x00"}, {"cursor": nul_cursor()}]

    async def attacker() -> list[httpx.Response]:
        return [
            await client.get("/catalog/products", params=attack)
            for _ in range(20)
            for attack in attacks
        ]

    async def bystander() -> list[int]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as http:
            return [(await http.get("/catalog/products?limit=5")).status_code for _ in range(40)]

    hostile, served = await asyncio.gather(attacker(), bystander())
    after = await client.get("/catalog/products?limit=5")
    metrics = (await client.get("/metrics")).text

    assert Counter(response.status_code for response in hostile) == {422: 60}
    for response, attack in zip(hostile, attacks * 20, strict=True):
        assert response.headers["content-type"] == PROBLEM
        assert ["query", *attack] in [error["loc"] for error in response.json()["errors"]]
    assert served == [200] * 40
    assert after.status_code == 200
    assert 'gateway_upstream_replicas{route="catalog",state="available"} 2.0' in metrics
    assert 'gateway_upstream_replicas{route="catalog",state="ejected"} 0.0' in metrics


async def test_an_integer_beyond_64_bits_is_a_422_not_an_outage(client: httpx.AsyncClient) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    response = await client.get(
        "/chat/rooms/r/messages", params={"after": "9" * 20}, headers=bearer(token)
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["loc"] == ["query", "after"]


async def guess(http: httpx.AsyncClient, email: str, password: str) -> int:
    response = await http.post("/auth/token", data={"username": email, "password": password})
    return response.status_code


async def test_concurrent_guesses_get_at_most_the_limit_of_checks(
    client: httpx.AsyncClient,
) -> None:
    victim = await register(client)
    statuses = await asyncio.gather(
        *(guess(client, victim["email"], f"guess number {n}") for n in range(40))
    )
    assert Counter(statuses) == {400: LOGIN_FAILURES_PER_ACCOUNT_AND_CLIENT, 429: 35}


def log_in_from_another_address(stack: Stack, email: str, password: str) -> int:
    """Logs in through the gateway from a container on the stack's network,
    whose address is not the test machine's."""
    container = stack.containers("chat")[0]["Name"]
    script = (
        "import sys, urllib.error, urllib.parse, urllib.request\n"
        "data = urllib.parse.urlencode({'username': sys.argv[1], 'password': sys.argv[2]})\n"
        "try:\n"
        "    answer = urllib.request.urlopen('http://gateway:8000/auth/token', data.encode())\n"
        "    print(answer.status)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code)\n"
    )
    done = subprocess.run(
        ["docker", "exec", container, "python", "-c", script, email, password],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return int(done.stdout.decode().strip())


async def test_a_strangers_guesses_never_lock_the_owner_out(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    owner = await register(client)
    strangers = [await guess(client, owner["email"], f"guess {n}") for n in range(10)]
    from_here = await guess(client, owner["email"], owner["password"])
    from_home = await asyncio.to_thread(
        log_in_from_another_address, stack, owner["email"], owner["password"]
    )
    assert strangers == [400] * 5 + [429] * 5
    assert from_here == 429  # the guessing address is locked out, right password or not
    assert from_home == 200  # the owner, elsewhere, is not


async def raw_exchange(stack: Stack, request: bytes, *, within: float) -> bytes:
    """Sends raw bytes to the gateway; returns all it answers before it closes."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(within):
            return await reader.read()
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_request_head_sent_too_slowly_is_cut_off(stack: Stack) -> None:
    # the rest of the head never comes; the gateway answers and closes
    raw = await raw_exchange(
        stack,
        b"GET /catalog/products HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
        within=HEADER_TIMEOUT_SECONDS + 20,
    )
    status, body = parse(raw)
    assert status == 408
    assert body["detail"] == "The request head did not arrive in time"


async def test_two_authorization_headers_are_a_400(client: httpx.AsyncClient) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    response = await client.get(
        "/auth/users/me",
        headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer forged")],
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["detail"] == "Send one Authorization header, not several"


async def test_a_streamed_body_over_the_limit_is_refused_at_the_gateway(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(32):
            yield b"x" * 65536  # 2 MiB, no Content-Length

    response = await client.post(
        "/auth/register", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["detail"] == "The request body exceeds 1048576 bytes"


async def test_the_import_key_is_read_from_the_header_only(client: httpx.AsyncClient) -> None:
    letters = "".join(chr(ord("a") + int(digit, 16) % 26) for digit in uuid.uuid4().hex[:8])
    row = [{"name": f"Imported {letters}", "price": "3.50"}]
    in_query = await client.post(
        "/catalog/products:import", params={"api_key": IMPORT_KEY}, json=row
    )
    in_header = await client.post(
        "/catalog/products:import", headers={"X-API-Key": IMPORT_KEY}, json=row
    )
    assert in_query.status_code == 401
    assert in_header.status_code == 201


async def sockets_on_two_replicas(
    stack: Stack, room: str, token: str
) -> tuple[list[ClientConnection], list[dict[str, Any]]]:
    """Opens sockets for one user until two sit on different replicas."""
    sockets: list[ClientConnection] = []
    readies: list[dict[str, Any]] = []
    while len({ready["node"] for ready in readies}) < 2:
        assert len(sockets) < 6, readies
        sockets.append(await open_socket(stack.ws_url, room, token))
        readies.append(await receive_json(sockets[-1]))
    return sockets, readies


async def test_the_chat_send_rate_is_per_user_across_replicas(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    sockets, readies = await sockets_on_two_replicas(stack, f"rate-{uuid.uuid4().hex[:8]}", token)
    pair = [
        sockets[-1],
        next(s for s, r in zip(sockets, readies, strict=True) if r["node"] != readies[-1]["node"]),
    ]
    frames = 100
    outcomes: Counter[str] = Counter()
    try:
        started = time.monotonic()
        for number in range(frames):
            await pair[number % 2].send(json.dumps({"type": "noop"}))  # cheap: no storage

        async def answers(socket: ClientConnection, count: int) -> None:
            while count:
                frame = await receive_json(socket)
                if frame["type"] == "error":
                    outcomes[frame["detail"]] += 1
                    count -= 1

        await asyncio.gather(answers(pair[0], frames // 2), answers(pair[1], frames // 2))
        elapsed = time.monotonic() - started
    finally:
        await asyncio.gather(*(socket.close() for socket in sockets))
    admitted = outcomes["Unknown frame type; expected message or auth"]
    dropped = outcomes["Rate limit exceeded; frame dropped"]
    assert admitted + dropped == frames
    # one allowance for the user, not one per socket (which would admit 80 at once)
    assert SEND_BURST <= admitted <= SEND_BURST + SEND_RATE_PER_SECOND * elapsed + 1
    assert dropped > 0


async def test_a_user_holds_at_most_the_limit_of_sockets_across_replicas(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    room = f"sockets-{uuid.uuid4().hex[:8]}"
    sockets = [await open_socket(stack.ws_url, room, token) for _ in range(MAX_SOCKETS_PER_USER)]
    try:
        nodes = {(await receive_json(socket))["node"] for socket in sockets}
        extra = await open_socket(stack.ws_url, room, token)
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(extra.recv(), 10)
        close = (extra.close_code, extra.close_reason)
        await sockets.pop().close()

        async def one_more_fits() -> bool:
            socket = await open_socket(stack.ws_url, room, token)
            sockets.append(socket)
            try:
                return bool((await receive_json(socket))["type"] == "ready")
            except ConnectionClosed:
                return False

        deadline = time.monotonic() + 10
        while not await one_more_fits():
            assert time.monotonic() < deadline, "a closed socket never freed its place"
    finally:
        await asyncio.gather(*(socket.close() for socket in sockets))
    assert len(nodes) >= 2  # the limit held across replicas
    assert close == (4029, f"too many sockets (at most {MAX_SOCKETS_PER_USER})")
