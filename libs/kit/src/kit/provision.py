"""A service's own PostgreSQL role and database, made by its migrate step.

Each service logs in as a role named after it, which owns its database and
nothing else: no superuser, no CREATEDB, no CREATEROLE, and PUBLIC may not even
connect to the database, so one service's role cannot reach another's data.
The migrate step is the only thing that connects as the server's superuser: it
creates the role (or resets its password to the configured one and strips any
extra privilege), creates the database owned by it, and hands it every object
in the database that someone else owns. That last step is what upgrades a
database made when one superuser owned everything.
"""

from __future__ import annotations

import logging

import asyncpg

logger = logging.getLogger("kit.provision")

_ROLE_OPTIONS = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"

# Every object in the database's own schemas that `role` does not own and that
# can change hands on its own: not extension members (deptype e), nor sequences
# and indexes that follow their table (a, i). Each row is a ready statement.
_FOREIGN_OBJECTS = """
WITH role AS (SELECT oid FROM pg_roles WHERE rolname = $1),
schemas AS (
    SELECT oid, nspname, nspowner FROM pg_namespace
    WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype IN ('e', 'a', 'i'))
SELECT format('ALTER SCHEMA %I OWNER TO %I', s.nspname, $1)
FROM schemas s
WHERE s.nspowner NOT IN ((SELECT oid FROM role), 'pg_database_owner'::regrole)
UNION ALL
SELECT format(
    'ALTER %s %I.%I OWNER TO %I',
    CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
        WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
    s.nspname, c.relname, $1)
FROM pg_class c JOIN schemas s ON s.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND c.relowner <> (SELECT oid FROM role)
  AND (c.oid) NOT IN (SELECT objid FROM members WHERE classid = 'pg_class'::regclass)
UNION ALL
SELECT format('ALTER %s %I.%I OWNER TO %I',
    CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, s.nspname, t.typname, $1)
FROM pg_type t JOIN schemas s ON s.oid = t.typnamespace
WHERE (t.typtype IN ('e', 'd', 'r')
       OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
  AND t.typowner <> (SELECT oid FROM role)
  AND t.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_type'::regclass)
UNION ALL
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, $1)
FROM pg_proc p JOIN schemas s ON s.oid = p.pronamespace
WHERE p.proowner <> (SELECT oid FROM role)
  AND p.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_proc'::regclass)
"""


async def provision(*, superuser_dsn: str, role: str, password: str, database: str) -> None:
    """Makes `role` (with `password`) the owner of `database` and of everything in it.

    `superuser_dsn` is a plain `postgresql://` DSN of the superuser on any
    database of the server (its database part is replaced). Idempotent, and
    safe to run while the service is up.
    """
    server = await asyncpg.connect(superuser_dsn, database="postgres")
    try:
        await _ensure_role(server, role, password)
        await _ensure_database(server, database, role)
    finally:
        await server.close()
    inside = await asyncpg.connect(superuser_dsn, database=database)
    try:
        async with inside.transaction():
            statements = [row[0] for row in await inside.fetch(_FOREIGN_OBJECTS, role)]
            for statement in statements:
                await inside.execute(statement)
    finally:
        await inside.close()
    if statements:
        logger.info("handed %d objects of database %s to %s", len(statements), database, role)


async def _ensure_role(server: asyncpg.Connection, role: str, password: str) -> None:
    exists = await server.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    if not exists:
        create = await server.fetchval(
            f"SELECT format('CREATE ROLE %I {_ROLE_OPTIONS} PASSWORD %L', $1::text, $2::text)",
            role,
            password,
        )
        try:
            await server.execute(create)
        except asyncpg.DuplicateObjectError:
            pass  # created meanwhile by a concurrent migrate step: set it below
        else:
            logger.info("created role %s", role)
            return
    alter = await server.fetchval(
        f"SELECT format('ALTER ROLE %I {_ROLE_OPTIONS} PASSWORD %L', $1::text, $2::text)",
        role,
        password,
    )
    await server.execute(alter)


async def _ensure_database(server: asyncpg.Connection, database: str, role: str) -> None:
    owner = await server.fetchval(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database
    )
    if owner is None:
        create = await server.fetchval(
            "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)", database, role
        )
        try:
            await server.execute(create)
            logger.info("created database %s owned by %s", database, role)
        except asyncpg.DuplicateDatabaseError:
            owner = ""  # created meanwhile: make sure of its owner below
    if owner is not None and owner != role:
        await server.execute(
            await server.fetchval(
                "SELECT format('ALTER DATABASE %I OWNER TO %I', $1::text, $2::text)",
                database,
                role,
            )
        )
        logger.info("database %s now owned by %s", database, role)
    await server.execute(
        await server.fetchval(
            "SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', $1::text)", database
        )
    )
