from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import service
from chat.bus import Bus, message_head, message_payload, room_channel
from chat.config import Settings
from kit_testing import Service, TokenMinter

from .factories import (
    ChatClient,
    Node,
    chat,
    has_text,
    joined_sockets,
    start_node,
    store,
    unique_room,
    wait_ready,
)


async def test_a_resend_of_a_message_stored_but_never_published_reaches_the_room(
    cluster: list[Node], minter: TokenMinter, engine: AsyncEngine
) -> None:
    """The sender's replica died (or lost the database's answer) between the
    commit and the publication: the client resends with its client_id, and
    the room gets the message once, on every replica, the sender too."""
    room = unique_room()
    token = minter.token(user_id="resender")
    async with (
        chat(cluster[0], room, token) as sender,
        chat(cluster[1], room, minter.token()) as elsewhere,
        chat(cluster[0], room, minter.token()) as beside,
    ):
        stored, duplicate = await service.store_message(
            engine=engine,
            room=room,
            user_id="resender",
            display_name="Resender",
            text="only once",
            client_id="c-lost",
            sent_at=datetime.now(UTC),
        )
        assert not duplicate
        await sender.say("only once", client_id="c-lost")
        (acknowledged,) = await sender.messages(1)
        (there,) = await elsewhere.messages(1)
        (here,) = await beside.messages(1)
        # and never twice: the next message is the next frame everyone reads
        await sender.say("after", client_id="c-next")
        for client in (sender, elsewhere, beside):
            (after,) = await client.messages(1)
            assert after["text"] == "after"
    assert acknowledged["id"] == there["id"] == here["id"] == stored.id
    assert acknowledged["client_id"] == "c-lost"


async def test_a_message_stored_but_never_published_reaches_the_room_within_a_heartbeat(
    cluster: list[Node], minter: TokenMinter, engine: AsyncEngine
) -> None:
    """Its replica was killed between the commit and the publication, and its
    sender never sent it again: every replica's heartbeat finds the room's
    newest id ahead of what it delivered, and reads it."""
    room = unique_room()
    async with (
        chat(cluster[0], room, minter.token()) as here,
        chat(cluster[1], room, minter.token()) as there,
    ):
        orphan = await store(engine, room, "never published")
        (seen_here,) = await here.messages(1)
        (seen_there,) = await there.messages(1)
        await here.say("next")
        (after,) = await there.messages(1)
    assert seen_here["id"] == seen_there["id"] == orphan.id
    assert seen_there["text"] == "never published"
    assert after["id"] == orphan.id + 1


async def test_a_catch_up_asked_while_a_read_is_under_way_reads_again_after_it(
    settings_for: Callable[..., Settings],
    minter: TokenMinter,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bus came back while the room's feed was reading the database: that
    read may predate what the outage missed, so the feed reads again once it is
    done, and does not leave the message to the heartbeat (a minute here)."""
    room = unique_room()
    joined = joined_sockets(monkeypatch)
    answered, release = asyncio.Event(), asyncio.Event()
    read_after = service.messages_after

    async def answered_late(**arguments: Any) -> Any:
        page = await read_after(**arguments)
        if not release.is_set():  # the first read: its answer comes back late
            answered.set()
            await release.wait()
        return page

    settings = settings_for(f"node-again-{room}", presence_heartbeat_seconds=60)
    async with start_node(settings, minter) as node, chat(node, room, minter.token()) as client:
        ((_, hub),) = joined
        feed = hub.feeds[room]
        monkeypatch.setattr(service, "messages_after", answered_late)
        feed.catch_up()  # a read under way...
        await asyncio.wait_for(answered.wait(), 10)
        missed = await store(engine, room, "stored while the bus was away")
        feed.catch_up()  # ...when the bus comes back
        release.set()
        (delivered,) = await client.messages(1)
    assert delivered["id"] == missed.id
    assert delivered["text"] == "stored while the bus was away"


async def test_a_hole_is_filled_from_the_database_in_order_and_once(
    cluster: list[Node], minter: TokenMinter, engine: AsyncEngine, redis_url: str
) -> None:
    room = unique_room()
    redis = Redis.from_url(redis_url)
    try:
        async with chat(cluster[0], room, minter.token()) as client:
            # 1 and 2 are stored but their publications are "lost"; 3 arrives first
            lost = [await store(engine, room, "one"), await store(engine, room, "two")]
            third = await store(engine, room, "three")
            await redis.publish(room_channel(room), message_payload(3, third.frame()))
            filled = await client.messages(3)
            # late and repeated publications change nothing
            for message in [*lost, third]:
                await redis.publish(
                    room_channel(room), message_payload(message.id, message.frame())
                )
            await client.say("four")
            (fourth,) = await client.messages(1)
    finally:
        await redis.aclose()
    assert [frame["text"] for frame in filled] == ["one", "two", "three"]
    assert [frame["id"] for frame in filled] == [1, 2, 3]
    assert fourth["id"] == 4


async def test_redis_outage_loses_nothing(
    cluster: list[Node], minter: TokenMinter, redis_service: Service
) -> None:
    """Messages sent before, during and after an outage reach every replica, in order."""
    room = unique_room()
    per_phase = 8
    async with (
        chat(cluster[0], room, minter.token(user_id="s0")) as s0,
        chat(cluster[1], room, minter.token(user_id="s1")) as s1,
        chat(cluster[0], room, minter.token()) as r0,
        chat(cluster[1], room, minter.token()) as r1,
        chat(cluster[2], room, minter.token()) as r2,
    ):

        async def phase(name: str) -> None:
            async def send(index: int, sender: ChatClient) -> None:
                for seq in range(per_phase):
                    text = f"{name}:{index}:{seq}"
                    await sender.say(text)
                    # the sender's replica stores and delivers it even without Redis
                    await sender.recv_until(has_text(text))

            await asyncio.gather(send(0, s0), send(1, s1))

        await phase("before")
        await asyncio.to_thread(redis_service.stop)
        try:
            async with httpx.AsyncClient(base_url=cluster[2].url) as http:
                not_ready = await http.get("/readyz")
            await phase("during")
        finally:
            await asyncio.to_thread(redis_service.start)
        await phase("after")
        total = 3 * 2 * per_phase
        received = await asyncio.gather(
            *(client.messages(total, within=30) for client in (r0, r1, r2))
        )
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["database"] == "ok"
    assert not_ready.json()["checks"]["bus"].startswith("failed")
    for frames in received:
        assert [frame["id"] for frame in frames] == list(range(1, total + 1))
    assert {frame["text"] for frame in received[2]} == {
        f"{name}:{i}:{seq}"
        for name in ("before", "during", "after")
        for i in range(2)
        for seq in range(per_phase)
    }
    for node in cluster:
        await wait_ready(node.url, within=30)


async def test_redis_restart_mid_stream_loses_nothing(
    cluster: list[Node], minter: TokenMinter, redis_service: Service
) -> None:
    room = unique_room()
    total = 40
    async with (
        chat(cluster[0], room, minter.token(user_id="writer")) as writer,
        chat(cluster[1], room, minter.token()) as r1,
        chat(cluster[2], room, minter.token()) as r2,
    ):

        async def write() -> None:
            for seq in range(total):
                await writer.say(f"m{seq}")
                await writer.recv_until(has_text(f"m{seq}"))

        writing = asyncio.create_task(write())
        await r1.messages(5)
        await asyncio.to_thread(redis_service.restart)
        await writing
        received = await asyncio.gather(
            r1.messages(total - 5, within=30), r2.messages(total, within=30)
        )
    assert [frame["id"] for frame in received[0]] == list(range(6, total + 1))
    assert [frame["id"] for frame in received[1]] == list(range(1, total + 1))
    for node in cluster:
        await wait_ready(node.url, within=30)


async def test_a_payload_with_or_without_trace_context_is_delivered(
    cluster: list[Node], minter: TokenMinter, engine: AsyncEngine, redis_url: str
) -> None:
    """Trace context is optional in the envelope: an older replica's message,
    without it, reaches the room as a traced one does."""
    room = unique_room()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    redis = Redis.from_url(redis_url)
    try:
        async with chat(cluster[1], room, minter.token()) as client:
            first = await store(engine, room, "untraced")
            second = await store(engine, room, "traced")
            await redis.publish(room_channel(room), message_payload(first.id, first.frame()))
            traced = message_payload(second.id, second.frame(), traceparent)
            assert traced.startswith(f"m:{second.id}/{traceparent}:")
            await redis.publish(room_channel(room), traced)
            received = await client.messages(2)
    finally:
        await redis.aclose()
    assert [frame["text"] for frame in received] == ["untraced", "traced"]
    assert message_head(f"{second.id}/{traceparent}") == (second.id, traceparent)
    assert message_head("12") == (12, None)


async def test_publications_kept_through_an_outage_go_out_once_each_in_order(
    redis_url: str,
) -> None:
    """The reconnect and the heartbeat both send what was kept: together they
    send every publication once, in the order it was made."""
    channel = room_channel(unique_room())
    publisher = Redis.from_url(redis_url)
    listener = Redis.from_url(redis_url, decode_responses=True)
    bus = Bus(url=redis_url, node_id=f"kept-{channel}", publisher=publisher)
    payloads = [f"kept {number}" for number in range(40)]
    received: list[str] = []
    try:
        async with listener.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            await pubsub.get_message(timeout=5)  # the confirmation
            for payload in payloads:  # the bus is down: kept
                await bus.publish(channel, payload)
            assert bus.backlog_size == len(payloads)
            bus.connected.set()  # back: the reconnect flushes, and so does a heartbeat
            await asyncio.gather(bus._flush_backlog(), bus.flush(), bus.flush())
            while len(received) < len(payloads):
                reply = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                assert reply is not None, f"only {len(received)} arrived"
                received.append(reply["data"])
            extra = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
    finally:
        await publisher.aclose()
        await listener.aclose()
    assert received == payloads
    assert extra is None
    assert bus.backlog_size == 0
