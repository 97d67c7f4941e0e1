"""Tables: one counter row per room, and the messages themselves. The one
place their columns are written: chat.service builds its statements from these
classes, and the migrations are checked against them (test_migrations)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from chat.db import Base


class Room(Base):
    """`last_id` is the newest message id; bumping it takes the row lock that
    serialises writers of one room, so ids follow commit order with no holes."""

    __tablename__ = "rooms"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("room", "user_id", "client_id"),)

    room: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    display_name: Mapped[str] = mapped_column(Text, nullable=False)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    client_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    # indexed for the retention purge (chat.service.purge_messages_before)
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
