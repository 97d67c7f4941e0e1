"""A message's row: the columns the messages table has, as the message holds them."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from chat.models import Message
from chat.schemas import StoredMessage


def test_a_messages_row_is_its_fields_by_the_tables_column_names() -> None:
    message = StoredMessage(
        room="lobby",
        id=7,
        user_id="u1",
        display_name="Ann",
        text="hello",
        client_id=None,
        sent_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    )
    row = message.row()
    assert row == dataclasses.asdict(message)
    assert set(row) == {column.name for column in Message.__table__.columns}
    assert row["sent_at"] is message.sent_at  # not a copy
