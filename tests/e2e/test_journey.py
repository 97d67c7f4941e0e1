"""The walking skeleton's user journey, driven only through the gateway."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Stack
from .helpers import bearer, login, open_socket, receive_json, receive_messages, register


async def test_register_login_and_me(client: httpx.AsyncClient) -> None:
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    assert tokens["token_type"] == "bearer"

    me = await client.get("/auth/users/me", headers=bearer(tokens["access_token"]))

    assert me.status_code == 200
    assert me.json()["email"] == user["email"]
    assert me.json()["roles"] == ["user"]
    assert me.headers["x-request-id"]
    assert float(me.headers["x-process-time"]) >= 0


async def test_admin_creates_a_product_and_the_list_shows_it(client: httpx.AsyncClient) -> None:
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    name = "Lamp " + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:8])

    created = await client.post(
        "/catalog/products",
        json={"name": f"  {name}  ", "price": "19.90", "tags": ["home"]},
        headers=bearer(admin["access_token"]),
    )

    assert created.status_code == 201, created.text
    product = created.json()
    assert product["name"] == name.title()
    assert product["price_with_tax"] == "21.89"
    listed = await client.get("/catalog/products", params={"q": name, "limit": 100})
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [product["id"]]


async def test_bad_input_is_problem_json(client: httpx.AsyncClient) -> None:
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)

    response = await client.post(
        "/catalog/products",
        json={"name": "R2D2", "price": "-1"},
        headers=bearer(admin["access_token"]),
    )

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    fields = {tuple(error["loc"]) for error in response.json()["errors"]}
    assert ("body", "name") in fields
    assert ("body", "price") in fields


async def test_chat_fans_out_across_replicas_in_order(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    room = f"e2e-{uuid.uuid4().hex[:8]}"
    sockets = [await open_socket(stack.ws_url, room, token) for _ in range(4)]
    try:
        readies = [await receive_json(socket) for socket in sockets]
        assert {ready["type"] for ready in readies} == {"ready"}
        assert len({ready["node"] for ready in readies}) == 2, readies

        per_socket = 3
        await asyncio.gather(
            *(
                socket.send(f'{{"type": "message", "text": "hello {index}-{n}"}}')
                for index, socket in enumerate(sockets)
                for n in range(per_socket)
            )
        )
        total = per_socket * len(sockets)
        streams = await asyncio.gather(*(receive_messages(socket, total) for socket in sockets))
    finally:
        await asyncio.gather(*(socket.close() for socket in sockets))

    first = readies[0]["last_id"]
    expected_ids = list(range(first + 1, first + total + 1))
    for stream in streams:
        assert [message["id"] for message in stream] == expected_ids
        assert {message["room"] for message in stream} == {room}
    texts = {message["text"] for message in streams[0]}
    assert texts == {f"hello {i}-{n}" for i in range(len(sockets)) for n in range(per_socket)}
