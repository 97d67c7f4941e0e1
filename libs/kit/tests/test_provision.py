"""Role provisioning against a real server; the fixture's `test` user is its superuser."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from kit.db import asyncpg_dsn
from kit.provision import provision


@pytest.fixture
def superuser_dsn(postgres_server_url: str) -> str:
    return asyncpg_dsn(f"{postgres_server_url}/test")


@pytest.fixture
def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"svc_{suffix}", f"db_{suffix}"


@pytest.fixture
async def superuser(superuser_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(superuser_dsn)
    yield connection
    await connection.close()


async def connect_as(
    superuser_dsn: str, role: str, password: str, database: str
) -> asyncpg.Connection:
    return await asyncpg.connect(superuser_dsn, user=role, password=password, database=database)


async def owners(superuser_dsn: str, database: str) -> dict[str, str]:
    connection = await asyncpg.connect(superuser_dsn, database=database)
    try:
        rows = await connection.fetch(
            """
            SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'v', 'i')
            UNION ALL
            SELECT t.typname, pg_get_userbyid(t.typowner) FROM pg_type t
            JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = 'public' AND t.typtype = 'e'
            UNION ALL
            SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public' AND p.proname = 'double_it'
            """
        )
    finally:
        await connection.close()
    return {row["name"]: row["owner"] for row in rows}


async def test_a_fresh_server_gets_the_role_and_its_database(
    superuser_dsn: str, superuser: asyncpg.Connection, names: tuple[str, str]
) -> None:
    role, database = names

    await provision(
        superuser_dsn=superuser_dsn, role=role, password="first-pass", database=database
    )

    owner = await superuser.fetchval(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database
    )
    assert owner == role
    flags = await superuser.fetchrow(
        "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1", role
    )
    assert tuple(flags) == (False, False, False)
    service = await connect_as(superuser_dsn, role, "first-pass", database)
    try:
        await service.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        await service.execute("CREATE TABLE things (id bigserial PRIMARY KEY)")
    finally:
        await service.close()


async def test_other_roles_cannot_connect_to_the_database(
    superuser_dsn: str, names: tuple[str, str]
) -> None:
    role, database = names
    other_role, other_database = f"{role}_other", f"{database}_other"
    await provision(superuser_dsn=superuser_dsn, role=role, password="pass-one", database=database)
    await provision(
        superuser_dsn=superuser_dsn, role=other_role, password="pass-two", database=other_database
    )

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await connect_as(superuser_dsn, other_role, "pass-two", database)


async def test_running_again_sets_the_configured_password_and_strips_privileges(
    superuser_dsn: str, superuser: asyncpg.Connection, names: tuple[str, str]
) -> None:
    role, database = names
    await superuser.execute(f"CREATE ROLE {role} LOGIN CREATEDB CREATEROLE PASSWORD 'old-pass'")

    await provision(superuser_dsn=superuser_dsn, role=role, password="new-pass", database=database)
    await provision(superuser_dsn=superuser_dsn, role=role, password="new-pass", database=database)

    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect_as(superuser_dsn, role, "old-pass", database)
    service = await connect_as(superuser_dsn, role, "new-pass", database)
    await service.close()
    flags = await superuser.fetchrow(
        "SELECT rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1", role
    )
    assert tuple(flags) == (False, False)


async def test_a_database_the_superuser_owned_is_handed_over_whole(
    superuser_dsn: str, superuser: asyncpg.Connection, names: tuple[str, str]
) -> None:
    """The upgrade path: everything was made by one superuser before roles existed."""
    role, database = names
    await superuser.execute(f"CREATE DATABASE {database}")
    legacy = await asyncpg.connect(superuser_dsn, database=database)
    try:
        await legacy.execute(
            """
            CREATE EXTENSION pg_trgm;
            CREATE TYPE mood AS ENUM ('calm', 'busy');
            CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);
            CREATE TABLE messages (id bigserial PRIMARY KEY, body text, mood mood);
            CREATE INDEX messages_body ON messages USING gin (body gin_trgm_ops);
            CREATE SEQUENCE tickets;
            CREATE VIEW recent AS SELECT id FROM messages;
            CREATE FUNCTION double_it(integer) RETURNS integer LANGUAGE sql AS 'SELECT $1 * 2';
            INSERT INTO messages (body, mood) VALUES ('kept', 'calm');
            """
        )
    finally:
        await legacy.close()

    await provision(superuser_dsn=superuser_dsn, role=role, password="handed", database=database)

    assert set((await owners(superuser_dsn, database)).values()) == {role}
    service = await connect_as(superuser_dsn, role, "handed", database)
    try:
        assert await service.fetchval("SELECT body FROM messages") == "kept"
        await service.execute(
            "INSERT INTO messages (body) VALUES ('new'); SELECT nextval('tickets')"
        )
        await service.execute("ALTER TABLE messages ADD COLUMN edited boolean")
        assert await service.fetchval("SELECT double_it(21)") == 42
    finally:
        await service.close()
