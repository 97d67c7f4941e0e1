"""The chat app: `create_app` builds it; the lifespan owns every connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypedDict

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chat.bus import Bus
from chat.config import Settings
from chat.db import SCHEMA_REVISIONS
from chat.hub import CLOSE_SHUTDOWN, Hub
from chat.limits import UserLimits
from chat.metrics import ChatMetrics
from chat.presence import Presence
from chat.router import router
from kit.app import assemble
from kit.db import check_database, make_engine, make_sessionmaker, schema_check
from kit.health import VERIFIER_CHECKS
from kit.logs import configure_logging
from kit.security import KeySource, TokenVerifier

logger = logging.getLogger("chat.main")


class State(TypedDict):
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    http: httpx.AsyncClient
    verifier: TokenVerifier
    presence: Presence
    hub: Hub
    bus: Bus
    limits: UserLimits


async def check_bus(request: Request) -> None:
    """Ready only if a publish on this replica's channel comes back to it."""
    bus: Bus = request.state.bus
    settings: Settings = request.state.settings
    await bus.probe(settings.bus_probe_timeout_seconds)


async def heartbeat(
    *,
    hub: Hub,
    bus: Bus,
    presence: Presence,
    redis: Redis,
    settings: Settings,
    limits: UserLimits,
) -> None:
    """Refreshes presence, republishes what waited for Redis, closes sockets whose
    token was revoked, checks that the subscriber still hears the bus, and keeps
    this replica's per-user socket counts alive."""
    while True:
        await asyncio.sleep(settings.presence_heartbeat_seconds)
        try:
            await limits.heartbeat()
        except (RedisError, OSError) as error:
            logger.warning("socket counts not refreshed: %s", error)
        try:
            await beat_once(hub=hub, bus=bus, presence=presence, redis=redis, settings=settings)
        except Exception:
            logger.exception(
                "heartbeat failed; next one in %s s", settings.presence_heartbeat_seconds
            )


async def beat_once(
    *, hub: Hub, bus: Bus, presence: Presence, redis: Redis, settings: Settings
) -> None:
    await presence.heartbeat(hub.presence_entries())
    await bus.flush()
    try:
        await hub.close_revoked(redis)
    except (RedisError, OSError) as error:
        logger.warning("revocation check of open sockets failed: %s", error)
    if bus.connected.is_set():
        try:
            await bus.probe(settings.bus_probe_timeout_seconds)
        except Exception as error:  # noqa: BLE001 - deaf or broken: start over
            logger.warning("bus probe failed, reconnecting the subscriber: %s", error)
            bus.force_reconnect()


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(service=settings.service_name, level=settings.log_level)
    registry = CollectorRegistry()
    metrics = ChatMetrics(registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        engine = make_engine(
            str(settings.database_url),
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_pool_overflow,
        )
        # bounded and blocking: a burst of sockets joining waits for a connection
        # instead of failing with "Too many connections"
        pool = BlockingConnectionPool.from_url(
            str(settings.redis_url),
            max_connections=settings.redis_max_connections,
            timeout=5.0,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            # after a Redis restart pooled connections are dead: retry on a fresh one
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        redis = Redis(connection_pool=pool)
        http = httpx.AsyncClient()
        verifier = TokenVerifier.for_service(settings, redis=redis, keys=key_source, http=http)
        await verifier.start()
        presence = Presence(
            redis=redis, node_id=settings.node_id, ttl_seconds=settings.presence_ttl_seconds
        )
        hub = Hub(
            engine=engine,
            settings=settings,
            presence=presence,
            node_id=settings.node_id,
            metrics=metrics,
        )
        bus = Bus(
            url=str(settings.redis_url),
            node_id=settings.node_id,
            publisher=redis,
            on_message=hub.on_bus_message,
            on_resync=hub.resync,
            backoff_max_seconds=settings.bus_backoff_max_seconds,
        )
        hub.bus = bus
        limits = UserLimits(
            redis=redis,
            node_id=settings.node_id,
            rate_per_second=settings.send_rate_per_second,
            burst=settings.send_burst,
            max_sockets=settings.max_sockets_per_user,
            liveness_seconds=settings.presence_ttl_seconds,
        )
        with contextlib.suppress(RedisError, OSError):  # else the heartbeat retries
            await limits.heartbeat()
        metrics.bus_connected.set_function(lambda: float(bus.connected.is_set()))
        metrics.bus_reconnects.set_function(lambda: float(bus.reconnects))
        metrics.rooms.set_function(lambda: float(len(hub.feeds)))
        metrics.watch_queues(hub.outbox_depths, lambda: bus.backlog_size)
        bus.start()
        beat = asyncio.create_task(
            heartbeat(
                hub=hub,
                bus=bus,
                presence=presence,
                redis=redis,
                settings=settings,
                limits=limits,
            ),
            name="heartbeat",
        )
        try:
            yield State(
                settings=settings,
                engine=engine,
                sessionmaker=make_sessionmaker(engine),
                redis=redis,
                http=http,
                verifier=verifier,
                presence=presence,
                hub=hub,
                bus=bus,
                limits=limits,
            )
        finally:
            beat.cancel()
            rooms = list(hub.feeds)
            await hub.close_all(CLOSE_SHUTDOWN, "server shutting down")
            await presence.clear(rooms)
            await limits.leave()
            await bus.stop()
            await verifier.aclose()
            await redis.aclose()
            await pool.aclose()
            await http.aclose()
            await engine.dispose()

    app = FastAPI(
        title="chat",
        summary="Chat rooms over WebSockets, ordered and resumable across replicas",
        lifespan=lifespan,
    )
    # Every socket stores its messages in PostgreSQL and hears the other
    # replicas through Redis: both are core. Sockets already open keep working
    # on this replica while Redis is away (see bus.py).
    assemble(
        app,
        settings,
        readiness={
            "database": check_database,
            "schema": schema_check(SCHEMA_REVISIONS),
            "bus": check_bus,
        },
        optional_readiness=VERIFIER_CHECKS,
        registry=registry,
    )
    app.include_router(router)
    return app
