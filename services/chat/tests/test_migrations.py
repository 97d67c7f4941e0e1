from __future__ import annotations

from chat import models  # noqa: F401 - registers the tables
from chat.db import SCHEMA_REVISIONS, Base
from kit_testing import migration_round_trip, script_revisions, unique_database_url

from .conftest import SERVICE_DIR


async def test_migrations_go_up_down_and_up_and_match_the_models(postgres_server_url: str) -> None:
    url = unique_database_url(postgres_server_url, "chat_migrations")

    result = await migration_round_trip(SERVICE_DIR, url, Base.metadata)

    assert result.tables_at_base == {"alembic_version"}
    assert result.tables_at_head == {"alembic_version", "rooms", "messages"}
    assert result.pending_changes == []


def test_the_code_names_every_revision_it_carries() -> None:
    """Readiness waits for the last of SCHEMA_REVISIONS: a migration added
    without it there would let replicas serve before their schema is there."""
    assert script_revisions(SERVICE_DIR) == SCHEMA_REVISIONS
