"""A chat client that behaves as a careful real one does after a fault: it
reconnects through the gateway with `since`, and re-sends, with the same
`client_id`, what was never acknowledged, and what the user's send rate
dropped once the server's `retry_after` has passed. It records everything it sees so a
test can check that nothing was lost, reordered or delivered twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .helpers import login, open_socket, register

RECONNECT_DEADLINE_SECONDS = 45.0


@dataclass
class ChatClient:
    ws_url: str
    room: str
    token: str
    name: str
    last_id: int = 0
    socket: ClientConnection | None = None
    nodes: list[str] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    # a re-sent client_id the server had stored already comes back as the
    # stored message again: the sender's acknowledgement, not a second delivery
    reacknowledged: list[int] = field(default_factory=list)
    sends: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    unacked: dict[str, str] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _retries: set[asyncio.Task[None]] = field(default_factory=set)
    _caught_up_to: int = 0

    @property
    def node(self) -> str:
        return self.nodes[-1]

    async def connect(self, *, resume: bool = False) -> None:
        """Connects (retrying while the system recovers) and reads the `ready` frame."""
        deadline = time.monotonic() + RECONNECT_DEADLINE_SECONDS
        delay = 0.1
        while True:
            try:
                socket = await open_socket(
                    self.ws_url, self.room, self.token, since=self.last_id if resume else None
                )
                ready = json.loads(await asyncio.wait_for(socket.recv(), 10))
                break
            except (OSError, InvalidHandshake, InvalidStatus, ConnectionClosed, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                # back-off with jitter: sockets dropped together do not return together
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
        assert ready["type"] == "ready", ready
        if not resume:
            self.last_id = ready["last_id"]
        self._caught_up_to = ready["last_id"]
        self.nodes.append(ready["node"])
        self.socket = socket
        self.connected.set()

    async def send(self, text: str) -> None:
        client_id = uuid.uuid4().hex
        self.unacked[client_id] = text
        await self._send_frame(client_id, text)

    async def _send_frame(self, client_id: str, text: str) -> None:
        if self.socket is None:
            return
        frame = json.dumps({"type": "message", "text": text, "client_id": client_id})
        try:
            await self.socket.send(frame)
        except ConnectionClosed:
            return  # re-sent after the reconnection
        self.sends[client_id] = self.sends.get(client_id, 0) + 1

    async def run(self) -> None:
        """Reads frames forever, reconnecting with `since` whenever the socket closes."""
        while True:
            assert self.socket is not None
            try:
                async for raw in self.socket:
                    await self._on_frame(json.loads(raw))
            except ConnectionClosed:
                pass
            self.close_codes.append(self.socket.close_code)
            self.connected.clear()
            await self.connect(resume=True)
            if self.last_id >= self._caught_up_to:
                await self._resend_unacked()

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "error" and frame.get("client_id") in self.unacked:
            # dropped by the user's send rate: resend it when the server says
            self._retries.add(asyncio.create_task(self._resend_later(frame)))
            return
        if frame["type"] != "message":
            return
        message_id = frame["id"]
        if message_id <= self.last_id:
            client_id = frame.get("client_id") or ""
            if self.sends.get(client_id, 0) > 1 and self.stored.get(client_id) == message_id:
                self.reacknowledged.append(message_id)
            else:
                self.duplicates.append(message_id)
            return
        if message_id != self.last_id + 1:
            self.gaps.append((self.last_id, message_id))
        self.last_id = message_id
        self.messages.append(frame)
        if frame.get("client_id") in self.sends:
            self.stored[frame["client_id"]] = message_id
        self.unacked.pop(frame.get("client_id") or "", None)
        if message_id == self._caught_up_to:
            # the replay after a reconnection is complete: what is still unacked was never stored
            await self._resend_unacked()

    async def _resend_later(self, dropped: dict[str, Any]) -> None:
        await asyncio.sleep(float(dropped.get("retry_after") or 0.1))
        client_id = dropped["client_id"]
        if client_id in self.unacked:
            await self._send_frame(client_id, self.unacked[client_id])

    async def _resend_unacked(self) -> None:
        for client_id, text in list(self.unacked.items()):
            await self._send_frame(client_id, text)

    async def close(self) -> None:
        for retry in self._retries:
            retry.cancel()
        if self.socket is not None:
            await self.socket.close()


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 30.0, what: Callable[[], str] | str = ""
) -> None:
    """Waits for `predicate()` to hold, checking after every scheduling round."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


def assert_complete(clients: list[ChatClient], expected_texts: set[str]) -> None:
    """Every client saw every message exactly once, with consecutive ids."""
    for client in clients:
        texts = [message["text"] for message in client.messages]
        assert client.duplicates == [], (client.name, client.duplicates)
        assert client.gaps == [], (client.name, client.gaps)
        assert set(texts) >= expected_texts, (client.name, expected_texts - set(texts))
        assert len(texts) == len(set(texts)), client.name
        ids = [message["id"] for message in client.messages]
        assert ids == sorted(ids)


ROUND_SECONDS = 45.0


@contextlib.asynccontextmanager
async def chat_clients(
    ws_url: str, http: httpx.AsyncClient, count: int, *, room_prefix: str
) -> AsyncIterator[list[ChatClient]]:
    """`count` clients of one new user in one new room, each reading in a task
    of its own, closed on the way out."""
    user = await register(http)
    token = (await login(http, user["email"], user["password"]))["access_token"]
    room = f"{room_prefix}-{uuid.uuid4().hex[:8]}"
    clients = [ChatClient(ws_url, room, token, name=f"c{index}") for index in range(count)]
    for client in clients:
        await client.connect()
    readers = [asyncio.create_task(client.run()) for client in clients]
    try:
        yield clients
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


def progress(clients: list[ChatClient], sent: set[str]) -> list[tuple[str, list[str], int]]:
    """Per client: its name, the replicas it was on, how many sent texts it lacks."""
    return [(c.name, c.nodes, len(sent - {m["text"] for m in c.messages})) for c in clients]


async def exchange(clients: list[ChatClient], tag: str, rounds: range, sent: set[str]) -> None:
    """Each client sends one message per round; a round ends when everyone has everything."""
    for number in rounds:

        def round_progress(number: int = number) -> str:
            return f"round {number} delivered everywhere: {progress(clients, sent)}"

        for client in clients:
            text = f"{tag}-{client.name}-{number}"
            sent.add(text)
            await client.send(text)
        await wait_until(
            lambda: all(sent <= {m["text"] for m in c.messages} for c in clients),
            within=ROUND_SECONDS,
            what=round_progress,
        )
