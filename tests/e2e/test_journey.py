"""The walking skeleton's user journey, driven only through the gateway."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from kit_testing import emailed_token

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
    sockets = [await open_socket(stack.ws_url, room, token) for _ in range(6)]
    try:
        readies = [await receive_json(socket) for socket in sockets]
        assert {ready["type"] for ready in readies} == {"ready"}
        assert len({ready["node"] for ready in readies}) == 3, readies

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


async def test_full_journey(stack: Stack, client: httpx.AsyncClient) -> None:
    # sign up, log in, refresh
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    tokens = refreshed.json()
    headers = bearer(tokens["access_token"])

    # an admin stocks a category of the catalog; the user pages through it
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    tag = "journey" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:6])
    created_ids = []
    for index in range(7):
        name = f"Item {chr(ord('a') + index)} {tag}"
        response = await client.post(
            "/catalog/products",
            json={"name": name, "price": f"{index + 1}.50", "tags": [tag]},
            headers=admin,
        )
        assert response.status_code == 201, response.text
        created_ids.append(response.json()["id"])
    seen: list[str] = []
    params: dict[str, str | int] = {"tag": tag, "limit": 3, "sort": "-price"}
    while True:
        page = await client.get("/catalog/products", params=params, headers=headers)
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        if page.json()["next_cursor"] is None:
            break
        params["cursor"] = page.json()["next_cursor"]
    assert seen == list(reversed(created_ids))

    # the admin edits one with If-Match; a stale version is refused
    product_id = created_ids[0]
    current = await client.get(f"/catalog/products/{product_id}")
    etag = current.headers["etag"]
    edited = await client.patch(
        f"/catalog/products/{product_id}",
        json={"price": "2.00"},
        headers={**admin, "If-Match": etag},
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["price"] == "2.00"
    assert edited.json()["name"] == current.json()["name"]
    stale = await client.patch(
        f"/catalog/products/{product_id}",
        json={"price": "3.00"},
        headers={**admin, "If-Match": etag},
    )
    assert stale.status_code == 412
    assert stale.headers["content-type"].startswith("application/problem+json")

    # chat in two rooms, clients over every chat replica
    rooms = [f"journey-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    sockets = {
        room: [await open_socket(stack.ws_url, room, tokens["access_token"]) for _ in range(3)]
        for room in rooms
    }
    try:
        nodes = set()
        for room_sockets in sockets.values():
            for socket in room_sockets:
                nodes.add((await receive_json(socket))["node"])
        assert len(nodes) == 3
        for room, room_sockets in sockets.items():
            await room_sockets[0].send(f'{{"type": "message", "text": "in {room}"}}')
        for room, room_sockets in sockets.items():
            for socket in room_sockets:
                [message] = await receive_messages(socket, 1)
                assert (message["room"], message["text"], message["id"]) == (room, f"in {room}", 1)
    finally:
        for room_sockets in sockets.values():
            await asyncio.gather(*(socket.close() for socket in room_sockets))

    # log out: the token is refused everywhere at once
    logout = await client.post("/auth/logout", headers=headers)
    assert logout.status_code == 204
    me = await client.get("/auth/users/me", headers=headers)
    assert me.status_code == 401
    assert me.headers["content-type"].startswith("application/problem+json")
    history = await client.get(f"/chat/rooms/{rooms[0]}/messages", headers=headers)
    assert history.status_code == 401
    catalog = await client.get("/catalog/products", headers=headers)
    assert catalog.status_code == 401
    refused = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refused.status_code == 401
    with pytest.raises(InvalidStatus) as refusal:
        await open_socket(stack.ws_url, rooms[0], tokens["access_token"])
    assert refusal.value.response.status_code in (401, 403)


async def test_a_password_reset_ends_every_session(stack: Stack, client: httpx.AsyncClient) -> None:
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    forgot = await client.post("/auth/password/forgot", json={"email": user["email"]})
    assert forgot.status_code == 202

    # the email goes out after the response, over SMTP to the suite's catcher
    _, reset_email = await stack.mail.wait_for(user["email"], count=2)  # welcome, reset
    assert reset_email["Subject"] == "Reset your Bazaar password"
    token = emailed_token(reset_email)

    new_password = "reset through the gateway"
    reset = await client.post(
        "/auth/password/reset", json={"token": token, "password": new_password}
    )
    assert reset.status_code == 204, reset.text
    again = await client.post("/auth/password/reset", json={"token": token, "password": "x" * 12})
    assert again.status_code == 400

    old = bearer(tokens["access_token"])
    assert (await client.get("/auth/users/me", headers=old)).status_code == 401
    assert (await client.get("/chat/rooms/lobby/messages", headers=old)).status_code == 401
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 401
    fresh = await login(client, user["email"], new_password)
    assert (
        await client.get("/auth/users/me", headers=bearer(fresh["access_token"]))
    ).status_code == 200
