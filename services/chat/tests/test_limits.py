from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from chat.config import Settings
from kit.testing import TokenMinter

from .factories import Node, StalledReader, chat, has_text, start_node, unique_room

SettingsFor = Callable[..., Settings]


@pytest.fixture(scope="module")
async def tight(settings_for: SettingsFor, minter: TokenMinter) -> AsyncIterator[Node]:
    """A replica with a short send queue and a strict per-socket rate."""
    settings = settings_for("node-tight", send_queue_size=8, send_rate_per_second=1.0, send_burst=3)
    async with start_node(settings, minter) as node:
        yield node


async def test_rate_limit_answers_with_an_error_frame(tight: Node, minter: TokenMinter) -> None:
    async with chat(tight, unique_room(), minter.token()) as client:
        for seq in range(5):
            await client.say(f"burst{seq}")
        frames = [
            await client.recv_until(lambda f: f["type"] in ("message", "error")) for _ in range(5)
        ]
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
    settings = settings_for("node-slow", send_queue_size=8, slow_consumer_close_seconds=30)
    async with (
        start_node(settings, minter) as node,
        chat(node, room, minter.token(user_id="sender")) as sender,
        chat(node, room, minter.token(user_id="fast")) as fast,
    ):
        slow = await StalledReader.open(node, room, minter.token(user_id="slow"))
        await fast.recv_until(lambda f: f["type"] == "join" and f["user"]["id"] == "slow")
        # 16 KB frames: the kernel holds a few MB before the server's own buffers fill
        total = 0
        while not any(frame["type"] == "leave" for frame in sender.seen):
            assert total < 2000, "the slow consumer was never dropped"
            text = f"{total:04d}" + "\N{GRINNING FACE}" * 3996
            await sender.say(text)
            await sender.recv_until(has_text(text))
            total += 1
        got = await fast.messages(total)
        # reading again drains what was buffered, then the close frame
        slow_frames, code, reason = await slow.drain()
    assert [frame["id"] for frame in got] == list(range(1, total + 1))
    assert [f["user"]["id"] for f in fast.seen if f["type"] == "leave"] == ["slow"]
    assert (code, reason) == (4008, "slow consumer")
    slow_ids = [frame["id"] for frame in slow_frames if frame["type"] == "message"]
    assert slow_ids == list(range(1, len(slow_ids) + 1))
    assert len(slow_ids) < total
