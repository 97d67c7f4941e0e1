"""Redis frozen: it takes connections and answers nothing (a partition, a
server stuck in a long command). Chat stores and delivers on: across replicas
too, through PostgreSQL, and nothing is doubled once Redis answers again."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from kit_testing import TokenMinter

from .factories import ChatClient, Node, chat, eventually, has_text, unique_room

FROZEN_MS = 15_000
"""How long Redis is paused for: ample for what must happen meanwhile. Redis
takes no command while paused, not even the one to unpause it."""


async def still_frozen(redis_url: str) -> bool:
    """Whether Redis still answers nothing (a fresh connection's PING)."""
    probe = Redis.from_url(redis_url, socket_timeout=0.3, socket_connect_timeout=0.3)
    try:
        await probe.ping()
    except Exception:  # noqa: BLE001 - a timeout is the answer
        return True
    finally:
        await probe.aclose()
    return False


async def answers(redis_url: str) -> bool:
    return not await still_frozen(redis_url)


async def messages_until(client: ChatClient, text: str) -> list[dict[str, Any]]:
    """The message frames the client reads up to and with the one of `text`."""
    frames = []
    while True:
        frame = await client.recv_type("message")
        frames.append(frame)
        if frame["text"] == text:
            return frames


async def test_a_frozen_redis_holds_no_message_back_and_doubles_none(
    cluster: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    room = unique_room("frozen")
    a, b = cluster[0], cluster[1]
    pauser = Redis.from_url(redis_url)
    async with (
        chat(a, room, minter.token(user_id="sender", name="S")) as sender,
        chat(a, room, minter.token(user_id="here", name="H")) as here,
        chat(b, room, minter.token(user_id="there", name="T")) as there,
    ):
        try:
            await pauser.client_pause(FROZEN_MS, all=True)
            await sender.say("one", client_id="f-1")
            await sender.say("two", client_id="f-2")
            # stored, and delivered on this replica and the other one, while
            # Redis still answers nothing
            for client in (here, there):
                await client.recv_until(has_text("one"))
                await client.recv_until(has_text("two"))
            frozen_throughout = await still_frozen(redis_url)
        finally:
            await eventually(lambda: answers(redis_url), within=FROZEN_MS / 1000 + 10)
            await pauser.aclose()
        # Redis is back: what was kept is published now, and dropped as delivered
        await sender.say("three", client_id="f-3")
        later = {name: await messages_until(c, "three") for name, c in (("a", here), ("b", there))}

    assert frozen_throughout
    for frames in later.values():
        assert [frame["text"] for frame in frames] == ["three"]
