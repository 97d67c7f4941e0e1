"""Test helpers: replicas served on loopback and a small chat client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from chat.config import Settings
from chat.main import create_app

if TYPE_CHECKING:
    from kit.testing import TokenMinter

TIMEOUT = 10.0


@dataclass
class Node:
    name: str
    url: str
    app: FastAPI

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)


async def wait_ready(url: str, within: float = TIMEOUT) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            response = await http.get("/readyz")
            if response.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready: {response.text}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def start_node(settings: Settings, minter: TokenMinter) -> AsyncIterator[Node]:
    from kit.testing import serve

    app = create_app(settings, key_source=minter.key_source)
    async with serve(app) as url:
        await wait_ready(url)
        yield Node(settings.node_id, url, app)


def unique_room(prefix: str = "room") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class ChatClient:
    ws: ClientConnection
    ready: dict[str, Any] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), within))
        self.seen.append(frame)
        return frame

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = TIMEOUT
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(frame):
                return frame

    async def recv_type(self, kind: str, within: float = TIMEOUT) -> dict[str, Any]:
        return await self.recv_until(lambda frame: frame["type"] == kind, within)

    async def messages(self, count: int, within: float = TIMEOUT) -> list[dict[str, Any]]:
        """The next `count` message frames, skipping presence frames."""
        return [await self.recv_type("message", within) for _ in range(count)]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def say(self, text: str, client_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "message", "text": text}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.send(frame)


def chat_uri(node: Node, room: str, since: int | None = None) -> str:
    query = "" if since is None else f"?since={since}"
    return f"{node.ws_url}/chat/ws/{room}{query}"


@contextlib.asynccontextmanager
async def chat(
    node: Node, room: str, token: str, *, since: int | None = None, **options: Any
) -> AsyncIterator[ChatClient]:
    async with connect(
        chat_uri(node, room, since),
        additional_headers={"Authorization": f"Bearer {token}"},
        **options,
    ) as ws:
        client = ChatClient(ws)
        client.ready = await client.recv()
        assert client.ready["type"] == "ready"
        yield client
