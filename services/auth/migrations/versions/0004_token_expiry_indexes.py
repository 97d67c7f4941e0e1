"""indexes on the tokens' expiry, for purging the expired ones

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Every login and every refresh adds a refresh token's row; auth now deletes
the rows a day past their expiry (`auth.service.purge_expired_tokens`), and
reset and verification tokens' with them. These indexes let it find them
without reading every row. A table grown large before this revision is
indexed once, as the migration runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("refresh_tokens", "password_resets", "email_verifications")


def upgrade() -> None:
    for table in TABLES:
        op.create_index(op.f(f"ix_{table}_expires_at"), table, ["expires_at"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(op.f(f"ix_{table}_expires_at"), table_name=table)
