"""an index on when each message was sent, for the retention purge

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

With `MESSAGE_RETENTION_DAYS` set, every replica deletes the messages older
than that now and then (`chat.service.purge_messages_before`). This index
finds them without reading every row. A table grown large before this
revision is indexed once, as the migration runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_messages_sent_at"), "messages", ["sent_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_sent_at"), table_name="messages")
