"""The catalog app: `create_app` builds it; the lifespan owns every connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypedDict

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from catalog import service
from catalog.config import Settings
from catalog.router import router
from kit.app import assemble
from kit.db import check_database, make_engine, make_sessionmaker
from kit.health import check_redis
from kit.logs import configure_logging
from kit.security import JwksKeySource, KeySource, TokenVerifier

logger = logging.getLogger("catalog")


class State(TypedDict):
    settings: Settings
    verifier: TokenVerifier
    redis: Redis
    http: httpx.AsyncClient
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    # Reads run in autocommit: no BEGIN/ROLLBACK round trips around one SELECT.
    readmaker: async_sessionmaker[AsyncSession]


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
        engine = make_engine(str(settings.database_url))
        redis = Redis.from_url(str(settings.redis_url))
        http = httpx.AsyncClient()
        keys = key_source or JwksKeySource(
            str(settings.jwks_url), http=http, algorithms=settings.jwt_algorithms
        )
        verifier = TokenVerifier(
            keys=keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            redis=redis,
        )
        sessions = sessionmaker or make_sessionmaker(engine)
        reads = sessionmaker or make_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        purger = asyncio.create_task(
            purge_idempotency_keys(sessions, settings.idempotency_purge_interval_seconds)
        )
        try:
            yield State(
                settings=settings,
                verifier=verifier,
                redis=redis,
                http=http,
                engine=engine,
                sessionmaker=sessions,
                readmaker=reads,
            )
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            await http.aclose()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Bazaar catalog",
        version="1.0.0",
        lifespan=lifespan,
        description="Products and categories: keyset pages, ETags, idempotent creates.",
    )
    assemble(app, settings, readiness={"database": check_database, "redis": check_redis})
    app.include_router(router)
    return app
