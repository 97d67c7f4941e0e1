"""SQL for messages. Ids come from the room's counter row, bumped in the same
transaction that stores the message: the row lock serialises one room's
writers, so ids are strictly increasing, without holes, in commit order."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from chat.schemas import StoredMessage

_NEXT_ID = text(
    "INSERT INTO rooms (id, last_id) VALUES (:room, 1) "
    "ON CONFLICT (id) DO UPDATE SET last_id = rooms.last_id + 1 RETURNING last_id"
)
_INSERT = text(
    "INSERT INTO messages (room, id, user_id, display_name, text, client_id, sent_at) "
    "VALUES (:room, :id, :user_id, :display_name, :text, :client_id, :sent_at)"
)
_COLUMNS = "room, id, user_id, display_name, text, client_id, sent_at"
_BY_CLIENT_ID = text(
    f"SELECT {_COLUMNS} FROM messages "
    "WHERE room = :room AND user_id = :user_id AND client_id = :client_id"
)
_AFTER = text(
    f"SELECT {_COLUMNS} FROM messages WHERE room = :room AND id > :after ORDER BY id LIMIT :limit"
)
_LAST_ID = text("SELECT last_id FROM rooms WHERE id = :room")


def _message(row: Sequence[Any]) -> StoredMessage:
    room, message_id, user_id, display_name, body, client_id, sent_at = row
    return StoredMessage(
        room=room,
        id=message_id,
        user_id=user_id,
        display_name=display_name,
        text=body,
        client_id=client_id,
        sent_at=sent_at,
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
    async with engine.connect() as connection, connection.begin() as transaction:
        message_id = (await connection.execute(_NEXT_ID, {"room": room})).scalar_one()
        if client_id is not None:
            # under the room's row lock: a concurrent first copy has committed or not started
            existing = (
                await connection.execute(
                    _BY_CLIENT_ID, {"room": room, "user_id": user_id, "client_id": client_id}
                )
            ).first()
            if existing is not None:
                await transaction.rollback()
                return _message(existing), True
        message = StoredMessage(
            room=room,
            id=message_id,
            user_id=user_id,
            display_name=display_name,
            text=text,
            client_id=client_id,
            sent_at=sent_at,
        )
        await connection.execute(
            _INSERT,
            {
                "room": room,
                "id": message_id,
                "user_id": user_id,
                "display_name": display_name,
                "text": text,
                "client_id": client_id,
                "sent_at": sent_at,
            },
        )
    return message, False


async def room_last_id(*, engine: AsyncEngine, room: str) -> int:
    async with engine.connect() as connection:
        last_id = (await connection.execute(_LAST_ID, {"room": room})).scalar_one_or_none()
    return int(last_id or 0)


async def messages_after(
    *, engine: AsyncEngine, room: str, after: int, limit: int
) -> list[StoredMessage]:
    """Stored messages with ids above `after`, oldest first."""
    async with engine.connect() as connection:
        rows = await connection.execute(_AFTER, {"room": room, "after": after, "limit": limit})
        return [_message(row) for row in rows]
