"""The chat app: `create_app` lists its parts; kit's lifespan opens and closes them."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from chat import service
from chat.bus import Bus
from chat.config import Settings
from chat.db import SCHEMA_REVISIONS
from chat.endpoint import SocketEntry
from chat.hub import Hub
from chat.limits import REDIS_TIMEOUT_SECONDS, UserLimits
from chat.metrics import ChatMetrics
from chat.presence import Presence
from chat.router import router
from kit.app import assemble
from kit.db import (
    DatabaseState,
    database_readiness,
    make_sessionmaker,
    open_unpinged_engine,
    purge_now_and_then,
)
from kit.health import VERIFIER_CHECKS
from kit.lifespan import Parts, lifespan, open_verifier
from kit.pools import REDIS_DRIVER, redis_reconnects
from kit.security import KeySource
from kit.tasks import every

logger = logging.getLogger("chat.main")


class State(DatabaseState[Settings]):
    redis: Redis
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
    redis: Redis,
    settings: Settings,
    limits: UserLimits,
) -> None:
    """Refreshes presence, republishes what waited for Redis, closes sockets whose
    token was revoked, checks that the subscriber still hears the bus, and keeps
    this replica's per-user socket counts alive (all of it Redis's work; the
    catch-up from PostgreSQL has a loop of its own)."""
    await every(
        settings.presence_heartbeat_seconds,
        lambda: beat_once(hub=hub, bus=bus, redis=redis, settings=settings, limits=limits),
        log=logger,
        failed=f"heartbeat failed; next one in {settings.presence_heartbeat_seconds} s",
        traceback=True,
    )


TICK_MARGIN_SECONDS = 0.005
"""How long after a tick of the grid a flush wakes: past the boundary, not just before it."""


def until_next_tick(now: float, interval: float) -> float:
    """Seconds from `now` to just after the next multiple of `interval`."""
    return interval - now % interval + TICK_MARGIN_SECONDS


async def presence_loop(hub: Hub, settings: Settings) -> None:
    """Every `presence_interval_seconds`: what changed goes to Redis and to the rooms.

    Flushes fall just after the wall clock's multiples of the interval, on
    every replica alike: the replicas' diffs of a room reach each other within
    `presence_gather_seconds` and go to the members as one frame."""
    interval = settings.presence_interval_seconds
    await every(
        lambda: until_next_tick(time.time(), interval),
        hub.flush_presence,
        log=logger,
        failed="presence flush failed",
        traceback=True,
    )


async def catch_up_loop(hub: Hub, settings: Settings) -> None:
    """Every `presence_heartbeat_seconds`: the rooms here read from PostgreSQL
    what they have not delivered though it was stored. A loop of its own, apart
    from the heartbeat's Redis work: while Redis is frozen (a partition, a
    server stuck in a long command) every call to it waits out its timeout,
    and the messages of the other replicas still arrive this way. A failure
    (the database away) is the next round's to mend."""
    await every(
        settings.presence_heartbeat_seconds,
        hub.catch_up_behind,
        log=logger,
        failed="rooms not checked for messages stored but not delivered",
    )


async def beat_once(
    *, hub: Hub, bus: Bus, redis: Redis, settings: Settings, limits: UserLimits
) -> None:
    try:
        await limits.heartbeat()
    except (RedisError, OSError) as error:
        logger.warning("socket counts not refreshed: %s", error)
    await hub.presence_heartbeat()
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


def open_command_redis(
    parts: Parts, settings: Settings, *, max_connections: int, socket_timeout: float = 5.0
) -> Redis:
    """A Redis client on a bounded, blocking pool: a burst of sockets joining
    waits for a connection instead of failing with "Too many connections"; after
    a Redis restart the pooled connections are dead, so a command is retried on
    a fresh one (`kit.pools.redis_reconnects`). A command that timed out is not
    sent again: a Redis that did not answer in `socket_timeout` is frozen (a
    partition, a server stuck in a long command), and each retry would hold
    the caller, and a pooled connection, as long again."""
    pool = BlockingConnectionPool.from_url(
        str(settings.redis_url),
        max_connections=max_connections,
        timeout=5.0,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        **redis_reconnects(),
        driver_info=REDIS_DRIVER,
    )
    return parts.add(Redis.from_pool(pool), Redis.aclose)


def watch(metrics: ChatMetrics, hub: Hub, bus: Bus) -> None:
    """The gauges read at scrape time."""
    metrics.bus_connected.set_function(lambda: float(bus.connected.is_set()))
    metrics.bus_reconnects.set_function(lambda: float(bus.reconnects))
    metrics.rooms.set_function(lambda: float(len(hub.feeds)))
    metrics.watch_queues(hub.outbox_depths, lambda: bus.backlog_size)


async def open_limits(parts: Parts, settings: Settings, redis: Redis) -> UserLimits:
    """The per-user limits, this replica already counted (else the heartbeat retries)."""
    limits = UserLimits(
        redis=redis,
        node_id=settings.node_id,
        rate_per_second=settings.send_rate_per_second,
        burst=settings.send_burst,
        max_sockets=settings.max_sockets_per_user,
        liveness_seconds=settings.presence_ttl_seconds,
    )
    parts.add(limits, UserLimits.leave)
    with contextlib.suppress(RedisError, OSError):
        await limits.heartbeat()
    return limits


async def open_parts(
    parts: Parts, settings: Settings, *, key_source: KeySource | None, metrics: ChatMetrics
) -> State:
    # a message is stored again once on a fresh connection (chat.service)
    engine = open_unpinged_engine(parts, settings)
    redis = open_command_redis(parts, settings, max_connections=settings.redis_max_connections)
    # publishing has connections of its own: it never waits behind presence or
    # the limits; a publish Redis has not taken in 2 s (frozen) is kept for the
    # reconnect, and the sender's next frame waits no longer (chat.bus)
    publisher = open_command_redis(
        parts,
        settings,
        max_connections=settings.redis_publish_connections,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
    )
    verifier = await open_verifier(parts, settings, redis=redis, keys=key_source)
    bus = Bus(
        url=str(settings.redis_url),
        node_id=settings.node_id,
        publisher=publisher,
        backoff_max_seconds=settings.bus_backoff_max_seconds,
    )
    parts.add(bus, Bus.stop)
    limits = await open_limits(parts, settings, redis)
    presence = Presence(
        redis=redis,
        node_id=settings.node_id,
        ttl_seconds=settings.presence_ttl_seconds,
        sockets_per_change=settings.presence_sockets_per_change,
        max_delay=settings.presence_max_delay_seconds,
    )
    parts.add(presence, Presence.clear)
    hub = Hub(engine=engine, settings=settings, presence=presence, bus=bus, metrics=metrics)
    parts.add(hub, Hub.shut_down)
    watch(metrics, hub, bus)
    bus.start(on_message=hub.on_bus_message, on_resync=hub.resync)
    parts.task(
        heartbeat(hub=hub, bus=bus, redis=redis, settings=settings, limits=limits),
        name="heartbeat",
    )
    parts.task(presence_loop(hub, settings), name="presence")
    parts.task(catch_up_loop(hub, settings), name="catch up")
    sessionmaker = make_sessionmaker(engine)
    if settings.message_retention_days > 0:
        retention = timedelta(days=settings.message_retention_days)
        parts.task(
            purge_now_and_then(
                sessionmaker,
                lambda session: service.purge_messages_before(
                    session=session, cutoff=datetime.now(UTC) - retention
                ),
                interval_seconds=settings.message_purge_interval_seconds,
                what="messages past the retention",
            ),
            name="purge old messages",
        )
    return State(
        settings=settings,
        verifier=verifier,
        engine=engine,
        sessionmaker=sessionmaker,
        redis=redis,
        presence=presence,
        hub=hub,
        bus=bus,
        limits=limits,
    )


class ChatApp(FastAPI):
    """FastAPI, with the rooms' sockets served first, by `SocketEntry`: under
    FastAPI each socket would keep a frame in each of its layers (its own
    telemetry and body limit, Starlette's app and error middleware) for as
    long as the socket lives."""

    sockets: SocketEntry | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sockets = self.sockets
        if sockets is not None and sockets.serves(scope):
            await sockets(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> FastAPI:
    app_settings = settings or Settings()
    registry = CollectorRegistry()
    metrics = ChatMetrics(registry)
    app = ChatApp(
        title="chat",
        summary="Chat rooms over WebSockets, ordered and resumable across replicas",
        # the collector stays as it is: a settled heap costs memory per idle socket
        lifespan=lifespan(
            lambda parts: open_parts(parts, app_settings, key_source=key_source, metrics=metrics),
            settle_heap=False,
        ),
    )
    # Every socket stores its messages in PostgreSQL and hears the other
    # replicas through Redis: both are core. Sockets already open keep working
    # on this replica while Redis is away (see bus.py).
    assemble(
        app,
        app_settings,
        readiness=database_readiness(SCHEMA_REVISIONS, bus=check_bus),
        optional_readiness=VERIFIER_CHECKS,
        registry=registry,
    )
    app.include_router(router)
    app.sockets = SocketEntry(allowed_hosts=app_settings.trusted_hosts)
    return app
