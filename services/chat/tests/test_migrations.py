from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from chat import models  # noqa: F401 - registers the tables
from chat.db import Base
from kit.db import make_engine
from kit.testing import downgrade, migrate, unique_database_url

from .conftest import SERVICE_DIR


def differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_go_up_down_and_up_and_match_the_models(postgres_server_url: str) -> None:
    url = unique_database_url(postgres_server_url, "chat_migrations")
    await migrate(SERVICE_DIR, url)
    await downgrade(SERVICE_DIR, url, "base")
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            tables = (
                (
                    await connection.execute(
                        text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                    )
                )
                .scalars()
                .all()
            )
        assert sorted(tables) == ["alembic_version"]
        await migrate(SERVICE_DIR, url)
        async with engine.connect() as connection:
            diff = await connection.run_sync(differences)
            version = (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one()
    finally:
        await engine.dispose()
    assert diff == []
    assert version == "0001"
