"""How the catalog reaches PostgreSQL, opened by the lifespan:

- `sessionmaker`: sessions for writes, each committed in the service;
- `reads`: pooled connections for the other reads (categories), outside any
  transaction, so a read costs one round trip;
- `driver_connections`: bare asyncpg connections from a lean pool of their
  own (kit.point_pool), for the two hot reads: get-by-id, which the service
  batches on them (kit.batching), and the product list. On these a read runs
  SQL compiled once from SQLAlchemy Core, prepared once per connection, with
  no result layer: SQLAlchemy's costs a list page three to four times the CPU
  of the driver's fetch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from catalog.config import Settings
from kit.db import ReadConnections, make_sessionmaker, open_unpinged_engine, read_connections
from kit.lifespan import Parts
from kit.point_pool import Connections, PointReadPool, open_point_pool

__all__ = ["Database", "DatabaseOpener", "DriverConnections", "ReadConnections", "open_database"]

DriverConnections = Connections
"""Opens a bare asyncpg connection, for the hot reads."""


@dataclass(frozen=True, slots=True)
class Database:
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    reads: ReadConnections
    driver_connections: DriverConnections
    # get-by-id batches in flight at once: one per point connection
    point_concurrency: int
    point_pool: PointReadPool | None = None


DatabaseOpener = Callable[[Parts, Settings], Awaitable[Database]]


async def open_database(parts: Parts, settings: Settings) -> Database:
    """The engine, and get-by-id's pool beside it; neither connects before
    its first use, so start-up never waits on the database."""
    # reads retry once on a dropped connection; writes answer 503
    engine = open_unpinged_engine(parts, settings)
    point_pool = open_point_pool(parts, settings, max_size=settings.point_read_pool_size)
    return Database(
        engine=engine,
        sessionmaker=make_sessionmaker(engine),
        reads=read_connections(engine),
        driver_connections=point_pool.acquire,
        point_concurrency=settings.point_read_pool_size,
        point_pool=point_pool,
    )
