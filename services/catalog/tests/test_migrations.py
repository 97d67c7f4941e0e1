from __future__ import annotations

from catalog import models  # noqa: F401 - every table on the metadata
from catalog.db import SCHEMA_REVISIONS, Base
from kit_testing import migration_round_trip, script_revisions, unique_database_url

from .conftest import SERVICE_DIR

TABLES = {"alembic_version", "categories", "products", "idempotency_keys"}
SORT_INDEXES = {"ix_products_name_id", "ix_products_price_id", "ix_products_created_at_id"}


async def test_migrations_go_up_down_and_up_and_match_the_models(
    postgres_server_url: str,
) -> None:
    url = unique_database_url(postgres_server_url, "catalog_migrations")

    result = await migration_round_trip(SERVICE_DIR, url, Base.metadata)

    assert result.tables_at_base == {"alembic_version"}
    assert result.tables_at_head == TABLES
    assert result.indexes_at_head["products"] >= SORT_INDEXES
    assert result.pending_changes == []


def test_the_code_names_every_revision_it_carries() -> None:
    """Readiness waits for the last of SCHEMA_REVISIONS: a migration added
    without it there would let replicas serve before their schema is there."""
    assert script_revisions(SERVICE_DIR) == SCHEMA_REVISIONS
