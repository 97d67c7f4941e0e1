"""A bounded load run on loopback: mixed HTTP traffic and chat at once for a
fixed time (and at most a fixed number of requests), with zero errors and
zero lost messages. Figures are printed for the record, never asserted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from .chat_client import chat_clients, exchange
from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Stack
from .helpers import bearer, login, register

DURATION_SECONDS = 15.0
MAX_REQUESTS_PER_WORKER = 3000
HTTP_WORKERS = 6


async def test_mixed_load_has_no_errors_and_loses_nothing(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    product = await client.post(
        "/catalog/products", json={"name": "Load Test Kettle", "price": "30"}, headers=admin
    )
    assert product.status_code in (201, 409), product.text
    user = await register(client)
    headers = bearer((await login(client, user["email"], user["password"]))["access_token"])
    listed = await client.get("/catalog/products", params={"q": "Load Test Kettle"})
    product_id = listed.json()["items"][0]["id"]
    paths = ["/catalog/products?limit=20", f"/catalog/products/{product_id}", "/auth/users/me"]
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + DURATION_SECONDS

    async def http_worker() -> None:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as http:
            for number in range(MAX_REQUESTS_PER_WORKER):
                if time.monotonic() > deadline:
                    return
                response = await http.get(paths[number % len(paths)], headers=headers)
                statuses[response.status_code] += 1

    async def chat_load() -> int:
        async with chat_clients(stack.ws_url, client, 6, room_prefix="load") as clients:
            sent: set[str] = set()
            rounds = 0
            while time.monotonic() < deadline:
                await exchange(clients, "load", range(rounds, rounds + 1), sent)
                rounds += 1
            return len(sent)

    chat = asyncio.create_task(chat_load())
    await asyncio.gather(*(http_worker() for _ in range(HTTP_WORKERS)))
    messages = await chat

    total = sum(statuses.values())
    print(f"load: {total} requests {dict(statuses)}, {messages} chat messages")  # noqa: T201
    assert set(statuses) == {200}
    assert messages > 0
