"""Test helpers: replicas served on loopback and a small chat client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat import endpoint, service
from chat.config import Settings
from chat.connection import Connection
from chat.hub import Hub
from chat.main import create_app
from chat.schemas import StoredMessage

if TYPE_CHECKING:
    from kit_testing import TokenMinter

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


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def joined_sockets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Connection, Hub]]:
    """Every socket that joins a room from here on, with its replica's hub (the
    in-process nodes' insides, for the tests that must reach them)."""
    joined: list[tuple[Connection, Hub]] = []
    join_and_accept = endpoint.join_and_accept

    async def recorded(connection: Connection, hub: Hub, subprotocol: str | None) -> int | None:
        joined.append((connection, hub))
        return await join_and_accept(connection, hub, subprotocol)

    monkeypatch.setattr(endpoint, "join_and_accept", recorded)
    return joined


@contextlib.asynccontextmanager
async def start_node(
    settings: Settings, minter: TokenMinter, **serve_options: Any
) -> AsyncIterator[Node]:
    from kit_testing import serve

    app = create_app(settings, key_source=minter.key_source)
    async with serve(app, **serve_options) as url:
        await wait_ready(url)
        yield Node(settings.node_id, url, app)


async def presence_listing(node: Node, room: str, minter: TokenMinter) -> dict[str, Any]:
    """The room's presence listing as `node` answers it."""
    headers = {"Authorization": f"Bearer {minter.token()}"}
    async with httpx.AsyncClient(base_url=node.url, headers=headers) as http:
        response = await http.get(f"/chat/rooms/{room}/presence")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert body["room"] == room
    return body


async def presence_users(node: Node, room: str, minter: TokenMinter) -> list[dict[str, Any]]:
    """Who the room's presence listing names, as `node` answers it."""
    users: list[dict[str, Any]] = (await presence_listing(node, room, minter))["users"]
    return users


def has_text(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame.get("text") == text


def diffs_of(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """A frame as the frames it holds: a presence frame of several diffs gives
    each of them, in order; any other frame is itself."""
    diffs: list[dict[str, Any]] | None = frame.get("diffs")
    return diffs if frame.get("type") == "presence" and diffs is not None else [frame]


def presence_diffs(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every presence diff among `frames`, those of a frame of several included."""
    return [diff for frame in frames if frame["type"] == "presence" for diff in diffs_of(frame)]


def joins(user_id: str) -> Callable[[dict[str, Any]], bool]:
    """A presence diff in which `user_id` came."""
    return lambda frame: (
        frame.get("type") == "presence" and any(user["id"] == user_id for user in frame["joins"])
    )


def leaves(user_id: str) -> Callable[[dict[str, Any]], bool]:
    """A presence diff in which `user_id` went."""
    return lambda frame: (
        frame.get("type") == "presence" and any(user["id"] == user_id for user in frame["leaves"])
    )


async def store(
    engine: AsyncEngine, room: str, text: str, *, sent_at: datetime | None = None
) -> StoredMessage:
    """A message stored straight in PostgreSQL, as a replica stores one (not published)."""
    message, _ = await service.store_message(
        engine=engine,
        room=room,
        user_id="direct",
        display_name="Direct",
        text=text,
        client_id=None,
        sent_at=sent_at or datetime.now(UTC),
    )
    return message


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
        """The next frame `predicate` takes; a diff of a presence frame of
        several is tried on its own (and returned alone)."""
        deadline = time.monotonic() + within
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            for candidate in diffs_of(frame):
                if predicate(candidate):
                    return candidate

    async def recv_type(self, kind: str, within: float = TIMEOUT) -> dict[str, Any]:
        return await self.recv_until(lambda frame: frame["type"] == kind, within)

    async def messages(self, count: int, within: float = TIMEOUT) -> list[dict[str, Any]]:
        """The next `count` message frames, skipping presence frames."""
        return [await self.recv_type("message", within) for _ in range(count)]

    async def close_frame(self, within: float = TIMEOUT) -> tuple[int | None, str]:
        """Reads on until the server closes; returns its close code and reason."""
        try:
            while True:
                await self.recv(within)
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return None, ""
            return closed.rcvd.code, closed.rcvd.reason

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


class StalledReader:
    """A WebSocket client on a raw socket with a tiny receive window that stops
    reading after the handshake: the kernel's buffers fill, then the server's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    @contextlib.asynccontextmanager
    async def opened(cls, node: Node, room: str, token: str) -> AsyncIterator[StalledReader]:
        """A reader past the handshake, its socket closed on the way out whatever
        happened: the server cannot stop while a peer that reads nothing holds
        its socket open."""
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            reader = cls(sock)
            await reader._handshake(urlsplit(node.url), room, token)
            yield reader
        finally:
            sock.close()

    async def _handshake(self, address: SplitResult, room: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, (address.hostname, address.port))
        from kit_testing import websocket_upgrade

        request = websocket_upgrade(
            f"/chat/ws/{room}", address.netloc, headers={"Authorization": f"Bearer {token}"}
        )
        await loop.sock_sendall(self.sock, request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await asyncio.wait_for(loop.sock_recv(self.sock, 4096), TIMEOUT)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    async def drain(self) -> tuple[list[dict[str, Any]], int | None, str]:
        """Reads to the end: the text frames, then the close code and reason."""
        loop = asyncio.get_running_loop()
        frames: list[dict[str, Any]] = []
        while True:
            parsed = self._next_frame()
            if parsed is None:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), TIMEOUT)
                if not chunk:
                    return frames, None, ""
                self.buffer += chunk
                continue
            opcode, payload = parsed
            if opcode == 0x8:
                self.sock.close()
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                return frames, code, payload[2:].decode()
            if opcode == 0x1:
                frames.append(json.loads(payload))

    def _next_frame(self) -> tuple[int, bytes] | None:
        data = self.buffer
        if len(data) < 2:
            return None
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return None
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            if len(data) < 10:
                return None
            length, offset = int.from_bytes(data[2:10], "big"), 10
        if len(data) < offset + length:
            return None
        self.buffer = data[offset + length :]
        return opcode, data[offset : offset + length]
