"""The body of every service's Alembic `env.py`: async, online or offline.

The URL comes from `config.attributes["url"]` when a test injects one, else
from `MigrationSettings` (`DATABASE_URL`, with `DATABASE_PASSWORD` merged in),
else from alembic.ini.

With `DATABASE_SUPERUSER` set (compose's migrate steps), the step first makes
the service's role and database as that superuser (`kit.provision`), then
migrates as the service's role, so every table belongs to the role. Without
it, the URL's user must be allowed to create the database if it is missing.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from alembic import context
from pydantic import PostgresDsn, SecretStr
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from kit.db import asyncpg_dsn, ensure_database
from kit.provision import provision
from kit.settings import SettingsBase, is_weak_secret, url_password


class MigrationSettings(SettingsBase):
    """What a migrate step reads from its environment."""

    url_passwords: ClassVar[tuple[tuple[str, str], ...]] = (("database_url", "database_password"),)

    database_url: PostgresDsn | None = None
    database_password: SecretStr | None = None
    # The server's superuser, used by the migrate step and nothing else
    database_superuser: str | None = None
    database_superuser_password: SecretStr | None = None

    def superuser_dsn(self) -> str | None:
        if self.database_url is None or self.database_superuser is None:
            return None
        password = self.database_superuser_password
        url = make_url(str(self.database_url)).set(
            username=self.database_superuser,
            password=None if password is None else password.get_secret_value(),
            database="postgres",
        )
        return asyncpg_dsn(url.render_as_string(hide_password=False))

    def weak_production_secrets(self) -> list[str]:
        weak = super().weak_production_secrets()
        if self.database_url is not None and is_weak_secret(url_password(str(self.database_url))):
            weak.append("DATABASE_PASSWORD")
        superuser_password = self.database_superuser_password
        if self.database_superuser is not None and is_weak_secret(
            None if superuser_password is None else superuser_password.get_secret_value()
        ):
            weak.append("DATABASE_SUPERUSER_PASSWORD")
        return weak


def _configure_and_run(connection: Connection, metadata: MetaData) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def prepare_database(url: str, settings: MigrationSettings | None) -> None:
    """The role and database the URL names, made as the superuser if one is configured."""
    superuser_dsn = None if settings is None else settings.superuser_dsn()
    if superuser_dsn is None:
        await ensure_database(url)
        return
    parsed = make_url(url)
    if not parsed.username or not parsed.password or not parsed.database:
        raise RuntimeError("DATABASE_URL needs a user, a database and a password to provision")
    await provision(
        superuser_dsn=superuser_dsn,
        role=parsed.username,
        password=parsed.password,
        database=parsed.database,
    )


async def _run_online(url: str, metadata: MetaData, settings: MigrationSettings | None) -> None:
    await prepare_database(url, settings)
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure_and_run, metadata)
    finally:
        await engine.dispose()


def run_migrations(metadata: MetaData) -> None:
    config = context.config
    injected = config.attributes.get("url")
    settings = None if injected else MigrationSettings()
    url = (
        injected or (settings and settings.database_url) or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError("Set DATABASE_URL to run migrations")
    url = str(url)
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection, metadata)
        return
    asyncio.run(_run_online(url, metadata, settings))
