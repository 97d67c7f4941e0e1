from __future__ import annotations

from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from auth import models  # noqa: F401 - every table on the metadata
from auth.db import Base

from .conftest import SERVICE_DIR


def pending_changes(connection: Connection) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"compare_type": True})
    diff: list[object] = compare_metadata(context, Base.metadata)
    return diff


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_migrations_go_up_down_and_up_and_match_the_models(
    postgres_server_url: str,
) -> None:
    from kit.testing import downgrade, migrate, unique_database_url

    url = unique_database_url(postgres_server_url, "auth_migrations")
    await migrate(SERVICE_DIR, url)
    await downgrade(SERVICE_DIR, url, "base")
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(table_names) == {"alembic_version"}
        await migrate(SERVICE_DIR, url)
        async with engine.connect() as connection:
            tables = await connection.run_sync(table_names)
            assert tables == {"alembic_version", "users", "signing_keys", "refresh_tokens"}
            assert await connection.run_sync(pending_changes) == []
    finally:
        await engine.dispose()
