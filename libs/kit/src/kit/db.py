"""Async SQLAlchemy plumbing shared by the services that own a database."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, cast

import asyncpg
from fastapi import Request
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    MetaData,
    Table,
    delete,
    event,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from kit.lifespan import AppState, Parts, SettingsT
from kit.pools import observe_wait
from kit.settings import DatabaseSettings
from kit.tasks import every

logger = logging.getLogger("kit.db")

CONNECT_TIMEOUT_SECONDS = 3.0
"""How long opening a PostgreSQL connection may take, name lookup included.
Without it asyncpg waits 60 s, and a request during a database outage (a
name the network's DNS no longer answers for, a host that does not reply)
would hang instead of answering 503 at once."""

POOL_TIMEOUT_SECONDS = 10.0
"""How long a request waits its turn for a pooled connection, in the engine's
pool and the point-read pool, before it is refused (503, retry): a slow or
silent database must not gather requests whose clients gave up long ago."""

# Explicit constraint names, so Alembic can drop and alter them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


class DatabaseState(AppState[SettingsT], Generic[SettingsT]):
    """What kit reads from the state of an app that owns a database: the
    engine (readiness, pool metrics) and the sessions (`session_dependency`)."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]


ReadConnections = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
"""Opens a connection for reads for the length of an `async with`."""


def read_connections(engine: AsyncEngine) -> ReadConnections:
    """Pooled connections outside any transaction, for reads: a read costs its
    one round trip, where a session adds a BEGIN and a ROLLBACK around it."""
    return engine.execution_options(isolation_level="AUTOCOMMIT").connect


class MeasuredPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio pool, timing each checkout into `db_pool_wait_seconds`."""

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            return super()._do_get()
        finally:
            observe_wait("engine", started)


def make_engine(
    url: str, *, connect_options: Mapping[str, Any] | None = None, **overrides: Any
) -> AsyncEngine:
    """An engine that survives a PostgreSQL restart: stale connections are
    tested before use (`pool_pre_ping`) and recycled after half an hour.
    `connect_options` are asyncpg's `connect` arguments for every connection
    (`DatabaseSettings.database_connect_options`: the statement timeout and
    the command timeout)."""
    connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_SECONDS, **(connect_options or {})}
    options: dict[str, Any] = {
        "poolclass": MeasuredPool,
        "pool_pre_ping": True,
        "pool_size": 10,
        "max_overflow": 10,
        "pool_recycle": 1800,
        "pool_timeout": POOL_TIMEOUT_SECONDS,
        "connect_args": connect_args,
    }
    options.update(overrides)
    engine = create_async_engine(url, **options)
    event.listen(engine.sync_engine, "handle_error", _give_up_a_silent_connection)
    return engine


def _give_up_a_silent_connection(context: ExceptionContext) -> None:
    """asyncpg's command timeout fired: the database answered nothing in time
    (frozen, or cut off by the network). The connection is closed at once and
    taken for lost. Left to SQLAlchemy, a connection that timed out is closed
    politely, which waits up to 2 s more for an answer from the same silent
    server before the request hears anything."""
    if not isinstance(context.original_exception, TimeoutError) or context.connection is None:
        return
    context.is_disconnect = True
    with contextlib.suppress(Exception):  # invalidated already
        driver = context.connection.connection.driver_connection
        if driver is not None:
            driver.terminate()


def open_unpinged_engine(parts: Parts, settings: DatabaseSettings) -> AsyncEngine:
    """The service's engine, sized by its settings, disposed when the app stops,
    and without `pool_pre_ping`: on asyncpg the ping costs three round trips
    (BEGIN, ping, ROLLBACK) on every checkout, as many as the work it guards.
    A connection the database dropped (a restart) is found on use instead:
    SQLAlchemy then recycles the whole pool, and the service decides what runs
    again (a read; a write only where running it twice is safe)."""
    engine = make_engine(
        str(settings.database_url),
        connect_options=settings.database_connect_options,
        pool_pre_ping=False,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_overflow,
    )
    return parts.add(engine, AsyncEngine.dispose)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def session_dependency(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; services commit their own writes, this only closes."""
    sessionmaker: async_sessionmaker[AsyncSession] = request.state.sessionmaker
    async with sessionmaker() as session:
        yield session


async def check_database(request: Request) -> None:
    engine: AsyncEngine = request.state.engine
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def schema_check(revisions: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """A readiness check: the database's schema is the one this code needs.

    `revisions` are the service's Alembic revisions, oldest first, as its image
    carries them (a test keeps them in step with migrations/versions). Ready
    at the last one, or at a revision this code does not know: a newer release
    migrated first, and every migration keeps the release before it working,
    so a rolling update or a rollback keeps serving. Not ready while the
    database is at an older revision or has none (its migrate step has not
    run yet); ready by itself once it has, without a restart.
    """
    head = revisions[-1]
    older = frozenset(revisions[:-1])

    async def check_schema(request: Request) -> None:
        engine: AsyncEngine = request.state.engine
        async with engine.connect() as connection:
            try:
                result = await connection.execute(text("SELECT version_num FROM alembic_version"))
            except ProgrammingError:
                raise RuntimeError(f"no schema yet; this code needs {head}") from None
            versions = set(result.scalars())
        if not versions or versions <= older:
            found = ", ".join(sorted(versions)) or "none"
            raise RuntimeError(f"schema at {found}; this code needs {head}")

    return check_schema


Check = Callable[[Request], Awaitable[None]]


def database_readiness(revisions: Sequence[str], **more: Check) -> dict[str, Check]:
    """A service on PostgreSQL is ready when its database answers and its schema
    is the one its code needs (`schema_check`), and then when `more` pass."""
    return {"database": check_database, "schema": schema_check(revisions), **more}


def asyncpg_dsn(url: str) -> str:
    """The plain `postgresql://` form asyncpg itself accepts."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def ensure_database(url: str) -> None:
    """Creates the URL's database if it is missing (first start of a fresh server)."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        return
    server = asyncpg_dsn(parsed.set(database="postgres").render_as_string(hide_password=False))
    connection = await asyncpg.connect(server)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            quoted = '"' + name.replace('"', '""') + '"'
            try:
                await connection.execute(f"CREATE DATABASE {quoted}")
                logger.info("created database %s", name)
            except asyncpg.DuplicateDatabaseError:
                pass  # created meanwhile by a concurrent migrate step
    finally:
        await connection.close()


PURGE_BATCH = 1000
"""Rows a purge deletes per transaction (`delete_in_batches`)."""


async def delete_in_batches(
    session: AsyncSession, table: Table, condition: ColumnElement[bool]
) -> int:
    """Deletes the rows of `table` matching `condition`, `PURGE_BATCH` rows a
    transaction, so locks are held briefly however many there are (and a
    purge never holds the table's writers up for long); returns how many."""
    key = table.primary_key.columns
    purged = 0
    while True:
        batch = select(*key).where(condition).limit(PURGE_BATCH)
        deleted = await session.execute(delete(table).where(tuple_(*key).in_(batch)))
        await session.commit()
        count = cast(CursorResult[Any], deleted).rowcount
        purged += count
        if count < PURGE_BATCH:
            return purged


async def purge_now_and_then(
    sessionmaker: async_sessionmaker[AsyncSession],
    purge: Callable[[AsyncSession], Awaitable[int]],
    *,
    interval_seconds: float,
    what: str,
) -> None:
    """Runs `purge` (it deletes what has expired, and says how many rows) in
    a session of its own every `interval_seconds`, for the process's life. A
    failure, the database away, is logged and tried again at the next one.
    Every replica runs it: deleting what has expired twice deletes nothing."""

    async def purge_once() -> None:
        async with sessionmaker() as session:
            purged = await purge(session)
        if purged:
            logger.info("purged %d %s", purged, what)

    await every(interval_seconds, purge_once, log=logger, failed=f"purging {what} failed")
