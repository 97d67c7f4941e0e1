"""The auth app: `create_app` lists its parts; kit's lifespan opens and closes them."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auth import service
from auth.config import Settings
from auth.db import SCHEMA_REVISIONS
from auth.discovery import warn_if_issuer_is_elsewhere
from auth.keys import KeyRing, ensure_signing_key
from auth.oauth_router import router as oauth_router
from auth.passwords import Passwords
from auth.router import router
from auth.throttle import LoginThrottle
from auth.verification import router as verification_router
from kit.app import assemble
from kit.batching import BatchedReads
from kit.db import (
    DatabaseState,
    database_readiness,
    make_engine,
    make_sessionmaker,
    purge_now_and_then,
)
from kit.health import check_redis, check_revocations
from kit.lifespan import Parts, lifespan, open_redis, open_verifier
from kit.point_pool import PointReadPool, open_point_pool
from kit.security import KeySource

logger = logging.getLogger("auth.main")
STARTUP_RETRY_MAX_SECONDS = 10.0


class State(DatabaseState[Settings]):
    redis: Redis
    point_pool: PointReadPool
    user_reads: BatchedReads
    key_ring: KeyRing
    passwords: Passwords
    throttle: LoginThrottle
    bootstrap: asyncio.Task[None]


async def bootstrap(
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    key_ring: KeyRing,
    passwords: Passwords,
    settings: Settings,
) -> None:
    """Signing key and admin account, retried until the database answers.

    Runs in the background, so the app serves /healthz (and a 503 /readyz)
    while PostgreSQL is still starting: Swarm has no depends_on.
    """
    delay = 0.2
    while True:
        try:
            await ensure_signing_key(sessionmaker, settings)
            await key_ring.reload()
            await service.ensure_admin(
                sessionmaker=sessionmaker, passwords=passwords, settings=settings
            )
            await passwords.burn_verify("warm-up")  # computes the dummy hash now
        except (SQLAlchemyError, OSError) as error:
            logger.warning("auth bootstrap waiting for the database: %s", error)
        except Exception:  # keep retrying: readiness stays 503 meanwhile
            logger.exception("auth bootstrap failed; retrying")
        else:
            logger.info("auth bootstrap complete")
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, STARTUP_RETRY_MAX_SECONDS)


async def check_bootstrap(request: Request) -> None:
    """Ready once the signing key is loaded and the admin account exists."""
    startup: asyncio.Task[None] = request.state.bootstrap
    if not startup.done():
        raise RuntimeError("signing key and admin account not set up yet")


async def open_parts(parts: Parts, settings: Settings, *, key_source: KeySource | None) -> State:
    engine = make_engine(
        str(settings.database_url),
        connect_options=settings.database_connect_options,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_overflow,
    )
    parts.add(engine, AsyncEngine.dispose)
    sessionmaker = make_sessionmaker(engine)
    point_pool = open_point_pool(parts, settings, max_size=settings.point_read_pool_size)
    user_reads = service.user_reads(point_pool.acquire, max_in_flight=settings.point_read_pool_size)
    parts.add(user_reads, BatchedReads.aclose)
    redis = open_redis(parts, settings)
    key_ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
    passwords = Passwords.from_settings(settings)
    verifier = await open_verifier(parts, settings, redis=redis, keys=key_source or key_ring)
    startup = parts.task(
        bootstrap(
            sessionmaker=sessionmaker, key_ring=key_ring, passwords=passwords, settings=settings
        ),
        name="auth bootstrap",
    )
    parts.task(
        purge_now_and_then(
            sessionmaker,
            lambda session: service.purge_expired_tokens(session=session),
            interval_seconds=settings.token_purge_interval_seconds,
            what="expired tokens",
        ),
        name="purge expired tokens",
    )
    return State(
        settings=settings,
        verifier=verifier,
        engine=engine,
        sessionmaker=sessionmaker,
        point_pool=point_pool,
        user_reads=user_reads,
        redis=redis,
        key_ring=key_ring,
        passwords=passwords,
        throttle=LoginThrottle(redis=redis, settings=settings),
        bootstrap=startup,
    )


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> FastAPI:
    """`key_source` replaces the key ring for verification only (tests)."""
    app_settings = settings or Settings()
    app = FastAPI(
        title="Bazaar auth",
        summary="Accounts, OAuth 2.0 logins, ES256 access tokens, rotating refresh tokens",
        lifespan=lifespan(lambda parts: open_parts(parts, app_settings, key_source=key_source)),
    )
    # Ready with PostgreSQL and its bootstrap (signing key, admin): the JWKS,
    # registration and logins rest on them. Redis matters to some requests
    # only, which handle its absence themselves (see the README).
    assemble(
        app,
        app_settings,
        readiness=database_readiness(SCHEMA_REVISIONS, bootstrap=check_bootstrap),
        optional_readiness={"redis": check_redis, "revocations": check_revocations},
    )
    warn_if_issuer_is_elsewhere(app_settings)
    app.include_router(router)
    app.include_router(oauth_router)
    app.include_router(verification_router)
    return app
