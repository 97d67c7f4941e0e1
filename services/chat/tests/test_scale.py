"""Presence at scale: a join storm reaches members as a few batched diffs, and
Redis hears about rooms, not sockets."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import Redis

from chat.config import Settings
from kit_testing import TokenMinter

from .factories import ChatClient, Node, chat, presence_users, start_node, unique_room

SettingsFor = Callable[..., Settings]
STORM = 40
INTERVAL = 0.5


def net_connections(frames: list[dict[str, Any]]) -> dict[str, int]:
    """Sockets per user as the diffs tell it."""
    counts: dict[str, int] = {}
    for frame in frames:
        for user in frame["joins"]:
            counts[user["id"]] = counts.get(user["id"], 0) + user["connections"]
        for user in frame["leaves"]:
            counts[user["id"]] = counts.get(user["id"], 0) - user["connections"]
    return {user: count for user, count in counts.items() if count}


async def diffs_until(
    observer: ChatClient, expected: dict[str, int], within: float = 30.0
) -> list[dict[str, Any]]:
    """The presence frames the observer reads until they add up to `expected`."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while net_connections(frames) != expected:
        frame = await observer.recv(max(0.01, deadline - time.monotonic()))
        if frame["type"] == "presence":
            frames.append(frame)
    return frames


@contextlib.asynccontextmanager
async def presence_writes(redis_url: str, room: str) -> AsyncIterator[list[str]]:
    """Every HSET/HDEL on the room's presence hashes while inside (Redis MONITOR)."""
    seen: list[str] = []
    prefix = f"chat:presence:{room}:"
    client = Redis.from_url(redis_url, decode_responses=True)
    listening = asyncio.Event()

    async def watch() -> None:
        async with client.monitor() as monitor:
            listening.set()
            async for command in monitor.listen():
                words = str(command.get("command", "")).split()
                if words and words[0].upper() in ("HSET", "HDEL") and prefix in words[1]:
                    seen.append(words[0])

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(listening.wait(), 10)
    try:
        yield seen
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        await client.aclose()


async def test_a_join_storm_reaches_members_as_batched_diffs(
    settings_for: SettingsFor, minter: TokenMinter, redis_url: str
) -> None:
    room = unique_room("storm")
    everyone = {f"u{n}": 2 for n in range(STORM // 2)}
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = [
            await stack.enter_async_context(
                start_node(settings_for(name, presence_interval_seconds=INTERVAL), minter)
            )
            for name in ("storm-a", "storm-b")
        ]
        observer = await stack.enter_async_context(
            chat(nodes[0], room, minter.token(user_id="observer"))
        )
        await diffs_until(observer, {"observer": 1})
        async with presence_writes(redis_url, room) as writes:
            started = time.monotonic()
            async with contextlib.AsyncExitStack() as storm:
                # two sockets for each of STORM / 2 users, one on each replica
                await asyncio.gather(
                    *(
                        storm.enter_async_context(
                            chat(nodes[index % 2], room, minter.token(user_id=f"u{index // 2}"))
                        )
                        for index in range(STORM)
                    )
                )
                joined = await diffs_until(observer, everyone)
                elapsed = time.monotonic() - started
                listed = await presence_users(nodes[1], room, minter)
            left = await diffs_until(observer, dict.fromkeys(everyone, -2))
            flushes = 2 * (math.ceil((time.monotonic() - started) / INTERVAL) + 2)

    # O(1) frames per replica and interval, never one per socket
    assert len(joined) < STORM / 4, len(joined)
    assert len(joined) <= 2 * (math.ceil(elapsed / INTERVAL) + 2), (len(joined), elapsed)
    assert len(left) < STORM / 4, len(left)
    for frame in joined:  # each diff names a user once, with how many of its sockets came
        ids = [user["id"] for user in frame["joins"]]
        assert len(ids) == len(set(ids))
        assert frame["leaves"] == []
    # the listing counts sockets per user across both replicas
    assert {user["id"]: user["connections"] for user in listed} == {"observer": 1, **everyone}
    # Redis: at most one HSET and one HDEL per room, replica and flush, whatever the sockets
    assert len(writes) <= 2 * flushes, (len(writes), flushes)
    assert len(writes) < STORM, len(writes)
