"""The catalog app: `create_app` lists its parts; kit's lifespan opens and closes them."""

from __future__ import annotations

from fastapi import FastAPI
from redis.asyncio import Redis

from catalog import service
from catalog.config import Settings
from catalog.connections import DatabaseOpener, ReadConnections, open_database
from catalog.db import SCHEMA_REVISIONS
from catalog.errors import DatabaseUnavailable
from catalog.router import router
from kit.app import assemble
from kit.batching import BatchedReads, SharedReads
from kit.db import DatabaseState, database_readiness, purge_now_and_then
from kit.health import VERIFIER_CHECKS
from kit.lifespan import Parts, lifespan, open_redis, open_verifier
from kit.point_pool import PointReadPool
from kit.security import KeySource


class State(DatabaseState[Settings]):
    redis: Redis
    reads: ReadConnections
    list_reads: SharedReads
    point_reads: BatchedReads
    point_pool: PointReadPool | None


async def open_parts(
    parts: Parts, settings: Settings, *, key_source: KeySource | None, database: DatabaseOpener
) -> State:
    db = await database(parts, settings)
    redis = open_redis(parts, settings)
    verifier = await open_verifier(parts, settings, redis=redis, keys=key_source)
    point_reads = service.product_reads(db.driver_connections, max_in_flight=db.point_concurrency)
    parts.add(point_reads, BatchedReads.aclose)
    list_reads = parts.add(service.list_reads(db.driver_connections), SharedReads.aclose)
    parts.task(
        purge_now_and_then(
            db.sessionmaker,
            lambda session: service.purge_expired_idempotency_keys(session=session),
            interval_seconds=settings.idempotency_purge_interval_seconds,
            what="expired idempotency keys",
        ),
        name="purge idempotency keys",
    )
    return State(
        settings=settings,
        verifier=verifier,
        engine=db.engine,
        sessionmaker=db.sessionmaker,
        redis=redis,
        reads=db.reads,
        list_reads=list_reads,
        point_reads=point_reads,
        point_pool=db.point_pool,
    )


def create_app(
    settings: Settings | None = None,
    *,
    key_source: KeySource | None = None,
    database: DatabaseOpener = open_database,
) -> FastAPI:
    """The catalog app. `database` opens its connections to PostgreSQL (see
    catalog.connections); tests open theirs inside a transaction they roll back."""
    app_settings = settings or Settings()
    app = FastAPI(
        title="Bazaar catalog",
        version="1.0.0",
        lifespan=lifespan(
            lambda parts: open_parts(parts, app_settings, key_source=key_source, database=database)
        ),
        description="Products and categories: keyset pages, ETags, idempotent creates.",
    )
    # Ready with PostgreSQL alone: public reads need nothing else. Redis
    # (revocations) and auth (keys) matter only to authenticated writes, which
    # answer 503 themselves when those cannot be checked.
    assemble(
        app,
        app_settings,
        readiness=database_readiness(SCHEMA_REVISIONS),
        optional_readiness=VERIFIER_CHECKS,
        database_outage=DatabaseUnavailable,
    )
    app.include_router(router)
    return app
