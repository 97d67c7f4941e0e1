"""The catalog app: `create_app` builds it; the lifespan owns every connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypedDict

import asyncpg
import httpx
from fastapi import FastAPI, Request, Response
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from catalog import service
from catalog.batching import BatchedReads
from catalog.config import Settings
from catalog.deps import (
    ReadConnections,
    engine_connections,
    pool_connections,
    session_connections,
    session_driver_connections,
)
from catalog.errors import DatabaseUnavailable
from catalog.point_pool import PointReadPool
from catalog.router import router
from kit.app import assemble
from kit.db import asyncpg_dsn, check_database, make_engine, make_sessionmaker
from kit.errors import domain_error_response, is_outage, unexpected_error_response
from kit.health import VERIFIER_CHECKS
from kit.heap import settled_heap
from kit.logs import configure_logging
from kit.security import KeySource, TokenVerifier

logger = logging.getLogger("catalog")


class State(TypedDict):
    settings: Settings
    verifier: TokenVerifier
    redis: Redis
    http: httpx.AsyncClient
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    reads: ReadConnections
    point_reads: BatchedReads
    point_pool: PointReadPool


async def purge_idempotency_keys(
    sessionmaker: async_sessionmaker[AsyncSession], interval_seconds: float
) -> None:
    """Deletes expired idempotency keys now and then; survives a database outage."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            async with sessionmaker() as session:
                purged = await service.purge_expired_idempotency_keys(session=session)
            if purged:
                logger.info("purged %d expired idempotency keys", purged)
        except Exception as error:  # noqa: BLE001 - retried at the next interval
            logger.warning("idempotency key purge failed: %s", error)


async def on_database_error(request: Request, error: Exception) -> Response:
    """kit's handling, with this service's own words for the one dependency
    its reads and writes need."""
    if is_outage(error):
        logger.warning("database unreachable: %s", error)
        return domain_error_response(DatabaseUnavailable())
    return unexpected_error_response(error)


def create_app(
    settings: Settings | None = None,
    *,
    key_source: KeySource | None = None,
    sessionmaker: async_sessionmaker[AsyncSession] | None = None,
) -> FastAPI:
    """The catalog app. `sessionmaker` replaces both session factories built on
    the engine, so tests can bind every request to a connection they roll back."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        configure_logging(service=settings.service_name, level=settings.log_level)
        # No pre-ping: on asyncpg it costs three round trips (BEGIN, ping,
        # ROLLBACK) on every checkout, more than the query it guards. A
        # connection lost to a database restart is detected on use instead; the
        # whole pool is then recycled, reads retry once, and writes answer 503.
        engine = make_engine(
            str(settings.database_url),
            pool_pre_ping=False,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_pool_overflow,
        )
        # a connect that hangs (Redis stopping, a partition) fails after 2 s instead
        # of the kernel's minutes, so the revocation mirror reconnects promptly
        redis = Redis.from_url(str(settings.redis_url), socket_connect_timeout=2.0)
        http = httpx.AsyncClient()
        verifier = TokenVerifier.for_service(settings, redis=redis, keys=key_source, http=http)
        await verifier.start()
        sessions = sessionmaker or make_sessionmaker(engine)
        # Get-by-id has a lean pool of its own (see point_pool.py); it connects
        # on first use, so start-up never waits on the database.
        point_pool = PointReadPool(
            asyncpg_dsn(str(settings.database_url)), max_size=settings.point_read_pool_size
        )
        if sessionmaker is not None:
            reads = session_connections(sessionmaker)
            # the tests' one connection takes one statement at a time
            point_reads = service.product_reads(
                session_driver_connections(sessionmaker), max_in_flight=1
            )
        else:
            autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            reads = engine_connections(autocommit)
            point_reads = service.product_reads(
                pool_connections(point_pool), max_in_flight=settings.point_read_pool_size
            )
        purger = asyncio.create_task(
            purge_idempotency_keys(sessions, settings.idempotency_purge_interval_seconds)
        )
        try:
            with settled_heap():
                yield State(
                    settings=settings,
                    verifier=verifier,
                    redis=redis,
                    http=http,
                    engine=engine,
                    sessionmaker=sessions,
                    reads=reads,
                    point_reads=point_reads,
                    point_pool=point_pool,
                )
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await verifier.aclose()
            await http.aclose()
            await redis.aclose()
            await point_reads.aclose()
            await engine.dispose()
            await point_pool.close()

    app = FastAPI(
        title="Bazaar catalog",
        version="1.0.0",
        lifespan=lifespan,
        description="Products and categories: keyset pages, ETags, idempotent creates.",
    )
    # Ready with PostgreSQL alone: public reads need nothing else. Redis
    # (revocations) and auth (keys) matter only to authenticated writes, which
    # answer 503 themselves when those cannot be checked.
    assemble(
        app,
        settings,
        readiness={"database": check_database},
        optional_readiness=VERIFIER_CHECKS,
    )
    for error_type in (DBAPIError, OSError, asyncpg.PostgresConnectionError):
        app.add_exception_handler(error_type, on_database_error)
    app.include_router(router)
    return app
