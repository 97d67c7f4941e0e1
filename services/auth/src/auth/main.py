"""The auth app: `create_app()` builds it; the lifespan owns every resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypedDict

from fastapi import FastAPI, Request
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auth import service
from auth.config import Settings
from auth.discovery import warn_if_issuer_is_elsewhere
from auth.keys import KeyRing, ensure_signing_key
from auth.oauth_router import router as oauth_router
from auth.passwords import Passwords
from auth.router import router
from auth.throttle import LoginThrottle
from auth.verification import router as verification_router
from kit.app import assemble
from kit.db import check_database, make_engine, make_sessionmaker
from kit.health import check_redis, check_revocations
from kit.heap import settled_heap
from kit.logs import configure_logging
from kit.security import KeySource, TokenVerifier

logger = logging.getLogger("auth.main")
STARTUP_RETRY_MAX_SECONDS = 10.0


class State(TypedDict):
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    key_ring: KeyRing
    passwords: Passwords
    verifier: TokenVerifier
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


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> FastAPI:
    """`key_source` replaces the key ring for verification only (tests)."""
    settings = settings or Settings()
    configure_logging(service=settings.service_name, level=settings.log_level)
    warn_if_issuer_is_elsewhere(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        engine = make_engine(str(settings.database_url))
        sessionmaker = make_sessionmaker(engine)
        # a connect that hangs (Redis stopping, a partition) fails after 2 s instead
        # of the kernel's minutes, so the revocation mirror reconnects promptly
        redis = Redis.from_url(str(settings.redis_url), socket_connect_timeout=2.0)
        key_ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
        passwords = Passwords.from_settings(settings)
        verifier = TokenVerifier.for_service(settings, redis=redis, keys=key_source or key_ring)
        await verifier.start()
        startup = asyncio.create_task(
            bootstrap(
                sessionmaker=sessionmaker,
                key_ring=key_ring,
                passwords=passwords,
                settings=settings,
            )
        )
        try:
            with settled_heap():
                yield State(
                    settings=settings,
                    engine=engine,
                    sessionmaker=sessionmaker,
                    redis=redis,
                    key_ring=key_ring,
                    passwords=passwords,
                    verifier=verifier,
                    throttle=LoginThrottle(redis=redis, settings=settings),
                    bootstrap=startup,
                )
        finally:
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await startup
            await verifier.aclose()
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Bazaar auth",
        summary="Accounts, OAuth 2.0 logins, ES256 access tokens, rotating refresh tokens",
        lifespan=lifespan,
    )
    # Ready with PostgreSQL and its bootstrap (signing key, admin): the JWKS,
    # registration and logins rest on them. Redis matters to some requests
    # only, which handle its absence themselves (see the README).
    assemble(
        app,
        settings,
        readiness={"database": check_database, "bootstrap": check_bootstrap},
        optional_readiness={"redis": check_redis, "revocations": check_revocations},
    )
    app.include_router(router)
    app.include_router(oauth_router)
    app.include_router(verification_router)
    return app
