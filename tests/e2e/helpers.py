"""Small clients for the public API, as a user of the gateway sees it."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect


async def register(http: httpx.AsyncClient, *, password: str = "a-long-password") -> dict[str, Any]:
    email = f"user-{uuid.uuid4().hex[:10]}@example.com"
    response = await http.post(
        "/auth/register",
        json={"email": email, "password": password, "display_name": "E2E User"},
    )
    assert response.status_code == 201, response.text
    return {**response.json(), "password": password}


async def login(http: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    response = await http.post("/auth/token", data={"username": email, "password": password})
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_socket(
    ws_url: str, room: str, token: str, *, since: int | None = None
) -> ClientConnection:
    query = f"?since={since}" if since is not None else ""
    return await connect(f"{ws_url}/chat/ws/{room}{query}", additional_headers=bearer(token))


async def receive_json(socket: ClientConnection, within: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(within):
        frame = await socket.recv()
    parsed: dict[str, Any] = json.loads(frame)
    return parsed


async def receive_messages(socket: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` message frames, skipping presence frames."""
    received: list[dict[str, Any]] = []
    while len(received) < count:
        frame = await receive_json(socket)
        if frame["type"] == "message":
            received.append(frame)
    return received


async def receive_of_type(socket: ClientConnection, kind: str) -> dict[str, Any]:
    """The next frame of one type, skipping the others (presence, for instance)."""
    frame = await receive_json(socket)
    while frame["type"] != kind:
        frame = await receive_json(socket)
    return frame
