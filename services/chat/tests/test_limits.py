from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat.config import Settings
from chat.limits import PROCESSES_KEY, UserLimits, rate_key, sockets_key
from kit_testing import TokenMinter, free_port

from .factories import (
    Node,
    StalledReader,
    chat,
    chat_uri,
    eventually,
    has_text,
    joins,
    leaves,
    presence_diffs,
    start_node,
    unique_room,
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def outcome_of(client_id: str) -> Callable[[dict[str, Any]], bool]:
    """The sender's own copy of its message (stored), or an error frame (dropped)."""
    return lambda frame: frame["type"] == "error" or frame.get("client_id") == client_id


SettingsFor = Callable[..., Settings]
TIGHT_FRAME_CHARS = 1000


def user_limits(redis: Redis, node_id: str, **overrides: Any) -> UserLimits:
    """A process's limits of its own: two frames, then one in ten seconds; five sockets."""
    values: dict[str, Any] = {
        "rate_per_second": 0.1,
        "burst": 2,
        "max_sockets": 5,
        "liveness_seconds": 20,
        **overrides,
    }
    return UserLimits(redis=redis, node_id=node_id, **values)


@pytest.fixture(scope="module")
async def tight(settings_for: SettingsFor, minter: TokenMinter) -> AsyncIterator[Node]:
    """A replica with a short send queue and a strict per-socket rate: a
    frame in ten seconds past the burst, so a slow machine's burst is still one."""
    settings = settings_for(
        "node-tight",
        send_queue_size=8,
        send_rate_per_second=0.1,
        send_burst=3,
        max_frame_chars=TIGHT_FRAME_CHARS,
    )
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


async def test_binary_and_oversized_frames_draw_on_the_allowance_too(
    tight: Node, minter: TokenMinter
) -> None:
    async with chat(tight, unique_room(), minter.token(user_id=f"b-{uuid.uuid4().hex[:8]}")) as c:
        await c.ws.send(b"\x00binary")
        await c.ws.send("x" * (TIGHT_FRAME_CHARS + 1))
        await c.ws.send(b"\x00binary")
        await c.say("over the burst", client_id="late")
        frames = [await c.recv_until(lambda f: f["type"] in ("message", "error")) for _ in range(4)]
    details = [frame["detail"] for frame in frames]
    assert details[0] == details[2] == "Binary frames are not supported; send JSON text"
    assert details[1].startswith("Frame too large")
    assert details[3] == "Rate limit exceeded; frame dropped"
    assert frames[3]["client_id"] == "late"


async def test_a_refused_user_is_refused_here_until_then_without_asking_redis(
    redis_url: str,
) -> None:
    """A client that ignores `retry_after` and floods costs the shared Redis one
    round trip per refusal window, not one per frame."""
    redis = Redis.from_url(redis_url)
    monitoring = Redis.from_url(redis_url, decode_responses=True)
    user, sentinel = f"flood-{uuid.uuid4().hex[:8]}", f"sentinel-{uuid.uuid4().hex}"
    limits = user_limits(redis, "flood")
    asked = 0
    try:
        async with monitoring.monitor() as monitor:
            waits = [await limits.take_frame(user) for _ in range(20)]
            await redis.get(sentinel)
            async for command in monitor.listen():
                words = str(command.get("command", "")).split()
                if sentinel in words:
                    break
                asked += words[:1] == ["EVALSHA"] and rate_key(user) in words
    finally:
        await redis.aclose()
        await monitoring.aclose()
    assert waits[:2] == [0.0, 0.0]
    assert all(wait > 0 for wait in waits[2:])
    assert asked == 3  # two taken, one refused; the other 17 refused here


async def test_slow_consumer_is_dropped_and_the_room_goes_on(
    settings_for: SettingsFor, minter: TokenMinter
) -> None:
    room = unique_room()
    settings = settings_for("node-slow", send_queue_size=8, slow_consumer_close_seconds=30)
    async with (
        start_node(settings, minter) as node,
        chat(node, room, minter.token(user_id="sender")) as sender,
        # reads every frame as it comes (no cap on what its client keeps), so it is
        # never a slow consumer itself, however long the stalled one takes to be
        chat(node, room, minter.token(user_id="fast"), max_queue=None) as fast,
        StalledReader.opened(node, room, minter.token(user_id="slow")) as slow,
    ):
        await fast.recv_until(joins("slow"))
        # 16 KB frames: the kernel holds a few MB before the server's own buffers fill
        total = 0
        while not any(leaves("slow")(frame) for frame in presence_diffs(sender.seen)):
            assert total < 2000, "the slow consumer was never dropped"
            text = f"{total:04d}" + "\N{GRINNING FACE}" * 3996
            await sender.say(text)
            await sender.recv_until(has_text(text))
            total += 1
        got = await fast.messages(total)
        # reading again drains what was buffered, then the close frame
        slow_frames, code, reason = await slow.drain()
    assert [frame["id"] for frame in got] == list(range(1, total + 1))
    assert [u["id"] for f in presence_diffs(fast.seen) for u in f["leaves"]] == ["slow"]
    assert (code, reason) == (4008, "slow consumer")
    slow_ids = [frame["id"] for frame in slow_frames if frame["type"] == "message"]
    assert slow_ids == list(range(1, len(slow_ids) + 1))
    assert len(slow_ids) < total


@pytest.fixture(scope="module")
async def strict_pair(settings_for: SettingsFor, minter: TokenMinter) -> AsyncIterator[list[Node]]:
    """Two replicas with a slow per-user rate and two sockets per user."""
    limits = {"send_rate_per_second": 0.1, "send_burst": 4, "max_sockets_per_user": 2}
    async with (
        start_node(settings_for("node-strict-1", **limits), minter) as first,
        start_node(settings_for("node-strict-2", **limits), minter) as second,
    ):
        yield [first, second]


async def test_the_send_rate_is_one_allowance_per_user_across_replicas(
    strict_pair: list[Node], minter: TokenMinter
) -> None:
    room, user = unique_room(), f"rate-{uuid.uuid4().hex[:8]}"
    first_node, second_node = strict_pair
    async with (
        chat(first_node, room, minter.token(user_id=user)) as here,
        chat(second_node, room, minter.token(user_id=user)) as there,
    ):
        for number in range(3):
            await here.say(f"here {number}", client_id=f"h{number}")
            await there.say(f"there {number}", client_id=f"t{number}")
        frames = [await here.recv_until(outcome_of(f"h{n}")) for n in range(3)]
        frames += [await there.recv_until(outcome_of(f"t{n}")) for n in range(3)]
    accepted = [f for f in frames if f["type"] == "message"]
    dropped = [f for f in frames if f["type"] == "error"]
    # a burst of 4 for the user, not 4 per socket: two frames are dropped
    assert len(accepted) == 4
    assert len(dropped) == 2
    for frame in dropped:
        assert frame["detail"] == "Rate limit exceeded; frame dropped"
        assert frame["retry_after"] > 0
        assert frame["client_id"] in {"h2", "t2", "h1", "t1"}


async def test_a_user_holds_at_most_the_limit_of_sockets_across_replicas(
    strict_pair: list[Node], minter: TokenMinter
) -> None:
    room, user = unique_room(), f"sockets-{uuid.uuid4().hex[:8]}"
    token = minter.token(user_id=user)
    first_node, second_node = strict_pair
    async with chat(first_node, room, token), chat(second_node, room, token) as second:
        async with connect(chat_uri(first_node, room), additional_headers=bearer(token)) as third:
            with pytest.raises(ConnectionClosed) as refused:
                await asyncio.wait_for(third.recv(), 10)
        async with chat(first_node, room, minter.token()) as someone_else:
            assert someone_else.ready["type"] == "ready"
        await second.ws.close()

        async def another_fits() -> bool:
            # refused (4029) until the other replica has counted the closed socket out
            async with connect(chat_uri(first_node, room), additional_headers=bearer(token)) as ws:
                try:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                except ConnectionClosed:
                    return False
                return bool(frame["type"] == "ready")

        await eventually(another_fits)
    assert refused.value.rcvd is not None
    assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (
        4029,
        "too many sockets (at most 2)",
    )


async def test_sockets_of_a_replica_that_stopped_heartbeating_stop_counting(
    strict_pair: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    user = f"ghost-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(redis_url)
    try:
        # a replica that died holding two sockets of the user, and one still alive
        await redis.hset(sockets_key(user), mapping={"dead:1": 2, "alive:1": 1})
        await redis.zadd(PROCESSES_KEY, {"alive:1": (time.time() + 60) * 1000})
        token = minter.token(user_id=user)
        async with chat(strict_pair[0], unique_room(), token) as admitted:
            assert admitted.ready["type"] == "ready"
            async with connect(
                chat_uri(strict_pair[1], unique_room()), additional_headers=bearer(token)
            ) as over:
                with pytest.raises(ConnectionClosed) as refused:
                    await asyncio.wait_for(over.recv(), 10)
        left = await redis.hgetall(sockets_key(user))
    finally:
        await redis.zrem(PROCESSES_KEY, "alive:1")
        await redis.aclose()
    assert refused.value.rcvd is not None
    assert refused.value.rcvd.code == 4029
    assert b"dead:1" not in left  # dropped by the first count that met it


async def test_without_redis_each_replica_enforces_the_limits_alone() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    limits = user_limits(redis, "alone", max_sockets=1)
    try:
        frames = [await limits.take_frame("u") for _ in range(3)]
        sockets = [await limits.open_socket("u"), await limits.open_socket("u")]
        await limits.close_socket("u")
        again = await limits.open_socket("u")
    finally:
        await redis.aclose()
    assert frames[:2] == [0.0, 0.0]
    assert frames[2] > 0
    assert sockets == [True, False]
    assert again is True


async def test_a_count_written_out_of_order_is_written_again(redis_url: str) -> None:
    """A socket closes while another of the user's opens: the open's script
    reaches Redis after the close's write, with the count from before the
    close. The count in Redis ends as the count here."""
    redis = Redis.from_url(redis_url)
    user = f"order-{uuid.uuid4().hex[:8]}"
    limits = user_limits(redis, "order", rate_per_second=10, burst=10)
    await limits.heartbeat()
    script = limits._open
    reached, release = asyncio.Event(), asyncio.Event()

    async def late(**arguments: Any) -> Any:
        reached.set()
        await release.wait()
        return await script(**arguments)

    try:
        assert await limits.open_socket(user)
        limits._open = late  # type: ignore[assignment]
        opening = asyncio.create_task(limits.open_socket(user))
        await reached.wait()  # its count (2) taken, its script not sent yet
        await limits.close_socket(user)  # writes 1
        release.set()
        assert await opening
        stored = await redis.hget(sockets_key(user), limits.process)
    finally:
        await limits.leave()
        await redis.delete(sockets_key(user))
        await redis.aclose()
    assert limits.sockets[user] == 1
    assert stored == b"1"
