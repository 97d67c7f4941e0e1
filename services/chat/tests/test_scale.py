"""Presence at scale: a join storm reaches members as a few batched diffs, and
Redis hears about rooms, not sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from chat import presence as presence_module
from chat.bus import presence_payload, room_channel
from chat.config import Settings
from chat.main import TICK_MARGIN_SECONDS, until_next_tick
from chat.presence import Presence
from chat.schemas import PresenceChange, presence_diff_frame
from kit_testing import TokenMinter, free_port

from .factories import (
    ChatClient,
    Node,
    chat,
    diffs_of,
    joins,
    presence_diffs,
    presence_users,
    start_node,
    unique_room,
)

SettingsFor = Callable[..., Settings]
STORM = 40
INTERVAL = 0.5


def net_connections(frames: list[dict[str, Any]]) -> dict[str, int]:
    """Sockets per user as the diffs tell it."""
    counts: dict[str, int] = {}
    for frame in presence_diffs(frames):
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

    # O(1) frames per interval, never one per socket: the replicas flush on the
    # same tick, and their diffs reach the observer together, as one frame
    assert len(joined) < STORM / 4, len(joined)
    assert len(joined) <= math.ceil(elapsed / INTERVAL) + 2, (len(joined), elapsed)
    assert len(left) < STORM / 4, len(left)
    for frame in presence_diffs(joined):  # each diff names a user once, with its sockets that came
        ids = [user["id"] for user in frame["joins"]]
        assert len(ids) == len(set(ids))
        assert frame["leaves"] == []
    # the listing counts sockets per user across both replicas
    assert {user["id"]: user["connections"] for user in listed} == {"observer": 1, **everyone}
    # Redis: at most one HSET and one HDEL per room, replica and flush, whatever the sockets
    assert len(writes) <= 2 * flushes, (len(writes), flushes)
    assert len(writes) < STORM, len(writes)


class Clock:
    """The presence module's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def joins_of(frame: str) -> dict[str, int]:
    return {user["id"]: user["connections"] for user in json.loads(frame)["joins"]}


async def listed(presence: Presence, room: str) -> dict[str, int]:
    return {user.id: user.connections for user in await presence.users(room)}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    moved = Clock()
    monkeypatch.setattr(presence_module, "_clock", moved)
    return moved


@contextlib.asynccontextmanager
async def held_presence(redis_url: str, **options: Any) -> AsyncIterator[Presence]:
    redis = Redis.from_url(redis_url)
    presence = Presence(redis=redis, node_id=f"held-{unique_room()}", ttl_seconds=30, **options)
    try:
        yield presence
    finally:
        await presence.clear()
        await redis.aclose()


async def test_a_large_rooms_changes_wait_until_they_are_worth_a_frame(
    redis_url: str, clock: Clock
) -> None:
    room = unique_room("held")
    async with held_presence(redis_url, sockets_per_change=2, max_delay=10.0) as presence:
        for user in ("a", "b", "c", "d"):
            presence.joined(room, user, user.upper())
        first = await presence.flush()  # 4 changes, 4 sockets here: not held
        presence.joined(room, "e", "E")
        presence.joined(room, "f", "F")
        presence.joined(room, "g", "G")
        held = await presence.flush()  # 3 changes for 7 sockets: fewer than one per 2
        listed_while_held = await listed(presence, room)
        presence.joined(room, "h", "H")
        worth_it = await presence.flush()  # 4 changes for 8 sockets
        listed_after = await listed(presence, room)

    assert joins_of(first[room]) == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert held == {}
    assert listed_while_held == {"a": 1, "b": 1, "c": 1, "d": 1}
    # every change held back comes in the one diff, none lost
    assert joins_of(worth_it[room]) == {"e": 1, "f": 1, "g": 1, "h": 1}
    assert listed_after == dict.fromkeys("abcdefgh", 1)


async def test_a_held_change_goes_out_at_the_next_boundary_of_the_delays_grid(
    redis_url: str, clock: Clock
) -> None:
    """Held changes go at the first multiple of the delay on the wall clock after
    the oldest of them: at most the delay later, and at the same instant on
    every replica."""
    room = unique_room("held")
    async with held_presence(redis_url, sockets_per_change=2, max_delay=3.0) as presence:
        for user in ("a", "b", "c", "d"):
            presence.joined(room, user, user.upper())
        await presence.flush()
        clock.now = 3000.0  # a boundary: 1000 delays
        presence.joined(room, "e", "E")
        clock.now += 2.5
        early = await presence.flush()
        clock.now += 0.5
        due = await presence.flush()
        clock.now += 1.0
        presence.joined(room, "f", "F")  # 1 s into the grid's next 3 s
        clock.now += 1.5
        early_again = await presence.flush()
        clock.now += 0.5  # 2 s after the change: the boundary
        due_again = await presence.flush()

    assert early == {}
    assert joins_of(due[room]) == {"e": 1}
    assert early_again == {}
    assert joins_of(due_again[room]) == {"f": 1}


async def test_small_rooms_and_a_rooms_last_leave_are_never_held(
    redis_url: str, clock: Clock
) -> None:
    small, emptied = unique_room("small"), unique_room("emptied")
    async with held_presence(redis_url, sockets_per_change=2, max_delay=3600.0) as presence:
        presence.joined(small, "a", "A")
        presence.joined(small, "b", "B")
        for user in ("a", "b", "c", "d", "e"):
            presence.joined(emptied, user, user.upper())
        await presence.flush()
        # 2 changes for the 2 sockets left here; the emptied room's last ones leave
        presence.joined(small, "c", "C")
        presence.left(small, "a", "A")
        for user in ("a", "b", "c", "d", "e"):
            presence.left(emptied, user, user.upper())
        frames = await presence.flush()
        listed_emptied = await listed(presence, emptied)

    assert json.loads(frames[small])["joins"][0]["id"] == "c"
    assert [user["id"] for user in json.loads(frames[small])["leaves"]] == ["a"]
    assert sorted(user["id"] for user in json.loads(frames[emptied])["leaves"]) == list("abcde")
    assert listed_emptied == {}


async def test_without_a_ratio_every_change_goes_out_at_the_next_flush(
    redis_url: str, clock: Clock
) -> None:
    room = unique_room("unheld")
    async with held_presence(redis_url) as presence:
        for user in ("a", "b", "c", "d", "e", "f"):
            presence.joined(room, user, user.upper())
        await presence.flush()
        presence.joined(room, "g", "G")
        frames = await presence.flush()

    assert joins_of(frames[room]) == {"g": 1}


def test_flushes_fall_just_after_the_wall_clocks_multiples_of_the_interval() -> None:
    for now in (1000.0, 1000.2, 1000.999, 123456.5):
        woken = now + until_next_tick(now, 1.0)
        assert math.floor(woken) == math.floor(now) + 1
        assert 0 < woken - math.floor(woken) <= 0.01
    assert 0.5 < until_next_tick(1000.0, 0.5) <= 0.51
    assert math.isclose(until_next_tick(1000.3, 0.5), 0.2 + TICK_MARGIN_SECONDS)


async def next_presence_frame(client: ChatClient) -> dict[str, Any]:
    """The next presence frame as it came (several diffs in one stay together)."""
    while (frame := await client.recv())["type"] != "presence":
        pass
    return frame


async def presence_counts(node: Node) -> dict[str, int]:
    """The replica's presence frames sent and the diffs they carried, from /metrics."""
    async with httpx.AsyncClient(base_url=node.url) as http:
        text = (await http.get("/metrics")).text
    counts = {}
    for line in text.splitlines():
        for name in ("frames", "diffs"):
            if line.startswith(f"chat_presence_{name}_total "):
                counts[name] = int(float(line.split()[1]))
    return counts


def remote_diff(room: str, node: str, seq: int, user_id: str) -> str:
    joins = [PresenceChange(user_id, user_id.upper(), 1, 1)]
    return presence_diff_frame(room=room, node=node, seq=seq, joins=joins, leaves=[])


@pytest.mark.parametrize("gather", [2.0, 0.0])
async def test_diffs_that_come_together_reach_members_as_one_frame(
    settings_for: SettingsFor, minter: TokenMinter, redis_url: str, gather: float
) -> None:
    room = unique_room("gathered")
    settings = settings_for(f"gather-{unique_room()}", presence_gather_seconds=gather)
    redis = Redis.from_url(redis_url)
    diffs = [remote_diff(room, "far-1", 10, "x"), remote_diff(room, "far-2", 20, "y")]
    diffs.append(remote_diff(room, "far-1", 11, "z"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            node = await stack.enter_async_context(start_node(settings, minter))
            observer = await stack.enter_async_context(
                chat(node, room, minter.token(user_id="observer"))
            )
            await observer.recv_until(joins("observer"), within=10)
            for diff in diffs:  # three diffs of two replicas, one after another
                await redis.publish(room_channel(room), presence_payload("far", diff))
            frames = [await next_presence_frame(observer) for _ in range(1 if gather else 3)]
            counted = await presence_counts(node)
    finally:
        await redis.aclose()

    assert [diff for frame in frames for diff in diffs_of(frame)] == [json.loads(d) for d in diffs]
    # the observer's own diff came alone; the three far ones in one frame or in three
    assert counted == ({"frames": 2, "diffs": 4} if gather else {"frames": 4, "diffs": 4})
    if gather:
        assert frames[0]["room"] == room
        assert len(frames[0]["diffs"]) == 3
    else:
        assert all("diffs" not in frame for frame in frames)


def frame_users(frame: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A presence frame's joins and leaves, as (user id, here)."""
    body = json.loads(frame)
    return (
        [(user["id"], user["here"]) for user in body["joins"]],
        [(user["id"], user["here"]) for user in body["leaves"]],
    )


async def test_a_replica_restarted_with_its_node_id_drops_what_the_old_process_left(
    redis_url: str,
) -> None:
    """A container restarted in place keeps its hostname, so its node id: the
    old process's users went with it, and must leave the room's listing and
    every member's view, though no replica ever finds the node dead."""
    redis = Redis.from_url(redis_url)
    node, room = f"restarted-{unique_room()}", unique_room()
    old = Presence(redis=redis, node_id=node, ttl_seconds=30)
    new = Presence(redis=redis, node_id=node, ttl_seconds=30)
    try:
        old.joined(room, "gus", "Gus")
        old.joined(room, "bob", "Bob")
        await old.flush()
        # the old process is killed: nothing of it runs again
        new.joined(room, "ann", "Ann")
        new.joined(room, "bob", "Bob")
        frames = await new.flush()
        listed = await new.users(room)
        new.joined(room, "cy", "Cy")
        later = await new.flush()
    finally:
        await new.clear()
        await redis.aclose()
    assert [user.id for user in listed] == ["ann", "bob"]
    joins, leaves = frame_users(frames[room])
    assert sorted(joins) == [("ann", 1), ("bob", 1)]
    assert leaves == [("gus", 0)]
    # once written whole, a room is written by its changes again
    assert frame_users(later[room]) == ([("cy", 1)], [])


async def test_a_frame_says_what_its_write_carried_not_what_came_while_it_was_written(
    redis_url: str,
) -> None:
    """Sockets come and go while a flush's write is under way: its frame
    gives each user's sockets as written, and the next flush names those who
    came or went since, once, with what they brought."""
    redis = Redis.from_url(redis_url)
    room = unique_room()
    presence = Presence(redis=redis, node_id=f"racing-{room}", ttl_seconds=30)
    try:
        presence.joined(room, "ann", "Ann")
        presence.joined(room, "bob", "Bob")
        first = asyncio.create_task(presence.flush())
        await asyncio.sleep(0)  # the flush now waits on Redis, its write sent
        presence.joined(room, "cy", "Cy")
        presence.left(room, "bob", "Bob")
        frames = await first
        later = await presence.flush()
        listed = await presence.users(room)
    finally:
        await presence.clear()
        await redis.aclose()
    assert frame_users(frames[room]) == ([("ann", 1), ("bob", 1)], [])
    assert frame_users(later[room]) == ([("cy", 1)], [("bob", 0)])
    assert [(user.id, user.connections) for user in listed] == [("ann", 1), ("cy", 1)]


async def test_a_replica_found_expired_that_wrote_again_is_not_buried(redis_url: str) -> None:
    """A heartbeat found a replica's entries expired (it was stalled); before
    the removal that follows, the replica wrote again: it stays, with its users,
    and nobody hears it is gone."""
    redis = Redis.from_url(redis_url)
    room = unique_room()
    live = Presence(redis=redis, node_id=f"live-{room}", ttl_seconds=30)
    stalled = Presence(redis=redis, node_id=f"stalled-{room}", ttl_seconds=30)
    try:
        live.joined(room, "ann", "Ann")
        stalled.joined(room, "bob", "Bob")
        await live.flush()
        await stalled.flush()
        # found expired by the live replica's heartbeat...
        await redis.zadd(f"chat:presence:{room}:nodes", {stalled.node_id: time.time() - 1})
        # ...which the stalled one's heartbeat overtakes, its expiry pushed ahead
        await stalled.heartbeat()
        buried = await live._bury([(room, stalled.node_id)])
        listed = await live.users(room)
    finally:
        await live.clear()
        await stalled.clear()
        await redis.aclose()
    assert buried == []
    assert [user.id for user in listed] == ["ann", "bob"]


async def test_a_replica_taken_for_dead_while_redis_was_away_announces_its_users_again(
    redis_url: str,
) -> None:
    """Redis away longer than the entries' lifetime: the first live replica
    to heartbeat after it finds the others' entries lapsed and announces them
    gone. A replica whose write failed meanwhile rewrites its rooms whole when
    Redis is back, and its frame names every user it has."""
    redis = Redis.from_url(redis_url)
    unreachable = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    room = unique_room()
    live = Presence(redis=redis, node_id=f"live-{room}", ttl_seconds=30)
    other = Presence(redis=redis, node_id=f"other-{room}", ttl_seconds=30)
    try:
        live.joined(room, "ann", "Ann")
        other.joined(room, "bob", "Bob")
        other.joined(room, "cy", "Cy")
        await live.flush()
        await other.flush()
        # Redis away: the other replica's heartbeat fails...
        other.redis = unreachable
        assert await other.heartbeat() == []
        # ...and its entries lapse (their score in the room's set is their expiry)
        await redis.zadd(f"chat:presence:{room}:nodes", {other.node_id: time.time() - 1})
        (gone,) = await live.heartbeat()
        other.redis = redis
        frames = await other.flush()
        listed = await live.users(room)
    finally:
        await live.clear()
        await other.clear()
        await unreachable.aclose()
        await redis.aclose()
    assert gone[0] == room
    assert json.loads(gone[1])["gone"] is True
    joins, leaves = frame_users(frames[room])
    assert sorted(joins) == [("bob", 1), ("cy", 1)]
    assert leaves == []
    assert [user.id for user in listed] == ["ann", "bob", "cy"]
