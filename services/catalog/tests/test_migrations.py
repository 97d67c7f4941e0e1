from __future__ import annotations

from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from catalog import models  # noqa: F401 - every table on the metadata
from catalog.db import Base

from .conftest import SERVICE_DIR

TABLES = {"alembic_version", "categories", "products", "idempotency_keys"}
SORT_INDEXES = {"ix_products_name_id", "ix_products_price_id", "ix_products_created_at_id"}


def pending_changes(connection: Connection) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"compare_type": True})
    diff: list[object] = compare_metadata(context, Base.metadata)
    return diff


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def product_indexes(connection: Connection) -> set[str]:
    return {str(index["name"]) for index in inspect(connection).get_indexes("products")}


async def test_migrations_go_up_down_and_up_and_match_the_models(
    postgres_server_url: str,
) -> None:
    from kit.testing import downgrade, migrate, unique_database_url

    url = unique_database_url(postgres_server_url, "catalog_migrations")
    await migrate(SERVICE_DIR, url)
    await downgrade(SERVICE_DIR, url, "base")
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(table_names) == {"alembic_version"}
        await migrate(SERVICE_DIR, url)
        async with engine.connect() as connection:
            assert await connection.run_sync(table_names) == TABLES
            assert await connection.run_sync(product_indexes) >= SORT_INDEXES
            assert await connection.run_sync(pending_changes) == []
    finally:
        await engine.dispose()
