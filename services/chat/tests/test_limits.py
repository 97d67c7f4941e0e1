from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat.config import Settings
from kit.testing import TokenMinter

from .factories import ChatClient, Node, chat, chat_uri, start_node, unique_room

SettingsFor = Callable[..., Settings]


@pytest.fixture(scope="module")
async def tight(settings_for: SettingsFor, minter: TokenMinter) -> AsyncIterator[Node]:
    """A replica with a short send queue and a strict per-socket rate."""
    settings = settings_for(
        "node-tight", send_queue_size=8, send_rate_per_second=1.0, send_burst=3
    )
    async with start_node(settings, minter) as node:
        yield node


async def test_rate_limit_answers_with_an_error_frame(tight: Node, minter: TokenMinter) -> None:
    async with chat(tight, unique_room(), minter.token()) as client:
        for seq in range(5):
            await client.say(f"burst{seq}")
        frames = [await client.recv_until(lambda f: f["type"] in ("message", "error")) for _ in range(5)]
    kinds = [frame["type"] for frame in frames]
    assert kinds.count("message") == 3
    assert kinds.count("error") == 2
    assert {f["detail"] for f in frames if f["type"] == "error"} == {
        "Rate limit exceeded; frame dropped"
    }


async def test_slow_consumer_is_dropped_and_the_room_goes_on(
    settings_for: SettingsFor, minter: TokenMinter
) -> None:
    room = unique_room()
    total = 150
    settings = settings_for("node-slow", send_queue_size=8, slow_consumer_close_seconds=30)
    async with start_node(settings, minter) as node:
        # a reader with a tiny receive window that stops reading altogether
        address = urlsplit(node.url)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, (address.hostname, address.port))
        async with (
            chat(node, room, minter.token(user_id="sender")) as sender,
            chat(node, room, minter.token(user_id="fast")) as fast,
            connect(
                chat_uri(node, room),
                additional_headers={"Authorization": f"Bearer {minter.token(user_id='slow')}"},
                sock=raw,
                max_queue=1,
            ) as slow_ws,
        ):
            await fast.recv_until(lambda f: f["type"] == "join" and f["user"]["id"] == "slow")
            for seq in range(total):
                await sender.say(f"{seq:04d}" + "x" * 3996)
                await sender.recv_until(lambda f, seq=seq: f.get("text", "")[:4] == f"{seq:04d}")
            got = await fast.messages(total)
            left = [frame for frame in fast.seen if frame["type"] == "leave"]
            # reading again drains what was buffered, then the close frame
            slow = ChatClient(slow_ws)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await slow.recv(within=10)
    assert [frame["id"] for frame in got] == list(range(1, total + 1))
    assert [frame["user"]["id"] for frame in left] == ["slow"]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert closed.value.rcvd.reason == "slow consumer"
    slow_ids = [frame["id"] for frame in slow.seen if frame["type"] == "message"]
    assert slow_ids == list(range(1, len(slow_ids) + 1))
    assert len(slow_ids) < total
