"""Message retention: with `MESSAGE_RETENTION_DAYS` set, every replica deletes
the messages older than that now and then; the rooms go on numbering."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

import kit.db
from chat import service
from chat.models import Message
from kit_testing import TokenMinter

from .factories import Node, chat, eventually, start_node, store, unique_room

PURGE_TASK = "purge old messages"


async def history_ids(node: Node, room: str, minter: TokenMinter) -> list[int]:
    headers = {"Authorization": f"Bearer {minter.token()}"}
    async with httpx.AsyncClient(base_url=node.url, headers=headers) as http:
        response = await http.get(f"/chat/rooms/{room}/messages", params={"after": 0})
    assert response.status_code == 200
    return [item["id"] for item in response.json()["items"]]


async def test_messages_past_the_retention_are_purged_and_the_room_goes_on(
    settings_for: object, minter: TokenMinter, engine: AsyncEngine
) -> None:
    room = unique_room("retained")
    long_ago = datetime.now(UTC) - timedelta(days=2)
    for text in ("old 1", "old 2", "old 3"):
        await store(engine, room, text, sent_at=long_ago)
    for text in ("new 4", "new 5"):
        await store(engine, room, text)
    settings = settings_for(  # type: ignore[operator]
        "node-retention", message_retention_days=1, message_purge_interval_seconds=0.05
    )
    async with start_node(settings, minter) as node:
        assert PURGE_TASK in {task.get_name() for task in asyncio.all_tasks()}

        async def purged() -> bool:
            return await history_ids(node, room, minter) == [4, 5]

        await eventually(purged)
        token = minter.token(user_id="keeper", name="Keeper")
        # the room's ids go on from the last one ever stored
        async with chat(node, room, token) as client:
            await client.say("after the purge", client_id="after-1")
            (sent,) = await client.messages(1)
        assert sent["id"] == 6
        # a resume from before the purge gets what is kept, the jump showing
        # what was removed
        async with chat(node, room, token, since=1) as client:
            replayed = await client.messages(3)
        assert [frame["id"] for frame in replayed] == [4, 5, 6]


async def test_without_a_retention_no_replica_purges(cluster: list[Node]) -> None:
    # the cluster's replicas run with the default settings (keep every message)
    assert cluster[0].app.state is not None
    assert PURGE_TASK not in {task.get_name() for task in asyncio.all_tasks()}


async def test_the_purge_deletes_in_batches_and_only_what_is_older(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = unique_room("batched")
    now = datetime.now(UTC)
    for minutes in (50, 40, 30, 20, 10):
        await store(
            engine, room, f"{minutes} minutes ago", sent_at=now - timedelta(minutes=minutes)
        )
    monkeypatch.setattr(kit.db, "PURGE_BATCH", 2)  # two full batches and one short
    async with kit.db.make_sessionmaker(engine)() as session:
        purged = await service.purge_messages_before(
            session=session, cutoff=now - timedelta(minutes=15)
        )
    assert purged >= 4  # other tests' rooms may hold old messages too
    async with engine.connect() as connection:
        left = await connection.execute(
            select(Message.id).where(Message.room == room).order_by(Message.id)
        )
        assert list(left.scalars()) == [5]
        count = await connection.scalar(
            select(func.count()).where(Message.sent_at < now - timedelta(minutes=15))
        )
    assert count == 0
