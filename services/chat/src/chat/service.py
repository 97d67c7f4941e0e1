"""SQL for messages. Ids come from the room's counter row, bumped in the same
transaction that stores the message: the row lock serialises one room's
writers, so ids are strictly increasing, without holes, in commit order."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Table, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chat.models import Message, Room
from chat.schemas import StoredMessage
from kit.db import delete_in_batches

logger = logging.getLogger("chat.service")
T = TypeVar("T")

# The statements are built once from the models' tables (chat.models owns the
# columns) and compiled once, on first use, into SQLAlchemy's statement cache.
_rooms: Table = Room.__table__  # type: ignore[assignment]
_messages: Table = Message.__table__  # type: ignore[assignment]
_NEXT_ID = (
    insert(_rooms)
    .values(id=bindparam("room"), last_id=1)
    .on_conflict_do_update(index_elements=[_rooms.c.id], set_={"last_id": _rooms.c.last_id + 1})
    .returning(_rooms.c.last_id)
)
_INSERT = insert(_messages)
_COLUMNS = (
    _messages.c.room,
    _messages.c.id,
    _messages.c.user_id,
    _messages.c.display_name,
    _messages.c.text,
    _messages.c.client_id,
    _messages.c.sent_at,
)
_BY_CLIENT_ID = select(*_COLUMNS).where(
    _messages.c.room == bindparam("room"),
    _messages.c.user_id == bindparam("user_id"),
    _messages.c.client_id == bindparam("client_id"),
)
_AFTER = (
    select(*_COLUMNS)
    .where(_messages.c.room == bindparam("room"), _messages.c.id > bindparam("after"))
    .order_by(_messages.c.id)
    .limit(bindparam("limit"))
)
_LAST_ID = select(_rooms.c.last_id).where(_rooms.c.id == bindparam("room"))
_LAST_IDS = select(_rooms.c.id, _rooms.c.last_id).where(
    _rooms.c.id == any_(bindparam("rooms", type_=ARRAY(_rooms.c.id.type)))
)


async def store_message(
    *,
    engine: AsyncEngine,
    room: str,
    user_id: str,
    display_name: str,
    text: str,
    client_id: str | None,
    sent_at: datetime,
) -> tuple[StoredMessage, bool]:
    """Stores a message; returns it and whether it is a repeat of a stored one.

    A repeated `client_id` of the same user returns the stored message and
    rolls back, so the counter is not bumped and no hole appears.
    """
    draft = StoredMessage(
        room=room,
        id=0,
        user_id=user_id,
        display_name=display_name,
        text=text,
        client_id=client_id,
        sent_at=sent_at,
    )
    counted: list[int] = []
    try:
        return await _store(engine, draft, counted)
    except DBAPIError as error:
        # A pooled connection that died with the database (a restart) is found
        # on use (no pre-ping: see kit.db.open_unpinged_engine), and SQLAlchemy
        # then recycles the whole pool. A failure before the room's counter
        # answered stored nothing, and a message with a client_id is found
        # again by it, so one more try on a fresh connection is safe.
        if not error.connection_invalidated or (client_id is None and counted):
            raise
        logger.info("storing a message in %s again on a fresh connection: %s", room, error)
    return await _store(engine, draft, [])


async def _store(
    engine: AsyncEngine, draft: StoredMessage, counted: list[int]
) -> tuple[StoredMessage, bool]:
    """`draft` stored under the room's next id (appended to `counted` once known)."""
    room = draft.room
    async with engine.connect() as connection, connection.begin() as transaction:
        message_id = (await connection.execute(_NEXT_ID, {"room": room})).scalar_one()
        counted.append(message_id)
        if draft.client_id is not None:
            # under the room's row lock: a concurrent first copy has committed or not started
            existing = (
                (
                    await connection.execute(
                        _BY_CLIENT_ID,
                        {"room": room, "user_id": draft.user_id, "client_id": draft.client_id},
                    )
                )
                .mappings()
                .first()
            )
            if existing is not None:
                await transaction.rollback()
                return StoredMessage(**existing), True
        message = replace(draft, id=message_id)
        await connection.execute(_INSERT, message.row())
    return message, False


async def room_last_id(*, engine: AsyncEngine, room: str) -> int:
    async def read() -> int:
        async with engine.connect() as connection:
            last_id = (await connection.execute(_LAST_ID, {"room": room})).scalar_one_or_none()
        return int(last_id or 0)

    return await read_again_if_stale(read)


async def rooms_last_ids(*, engine: AsyncEngine, rooms: list[str]) -> dict[str, int]:
    """The newest stored id of each room that has one, in one statement."""
    async with engine.connect() as connection:
        rows = await connection.execute(_LAST_IDS, {"rooms": rooms})
        return {room: int(last_id) for room, last_id in rows}


async def messages_after(
    *, engine: AsyncEngine, room: str, after: int, limit: int
) -> list[StoredMessage]:
    """Stored messages with ids above `after`, oldest first."""

    async def read() -> list[StoredMessage]:
        async with engine.connect() as connection:
            rows = await connection.execute(_AFTER, {"room": room, "after": after, "limit": limit})
            return [StoredMessage(**row) for row in rows.mappings()]

    return await read_again_if_stale(read)


async def purge_messages_before(*, session: AsyncSession, cutoff: datetime) -> int:
    """Deletes the messages sent before `cutoff`, in batches; returns how many.

    A room's counter row stays: the next message takes the id after the last
    one ever stored, so ids still follow commit order, and a reader finds the
    removed history as a jump in them (the room had no holes before)."""
    return await delete_in_batches(session, _messages, _messages.c.sent_at < cutoff)


async def read_again_if_stale(read: Callable[[], Awaitable[T]]) -> T:
    """A read that met a pooled connection the database dropped (a restart)
    runs once more: SQLAlchemy has recycled the pool by then."""
    try:
        return await read()
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        logger.info("reading again on a fresh connection: %s", error)
        return await read()
