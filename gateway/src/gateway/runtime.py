"""What the proxy needs at run time: routes and their pools, the upstream
clients, Redis, the token verifier, the rate limiter. Built without I/O
in `create_app`, opened and closed by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import httpx
from aiohttp import hdrs
from multidict import CIMultiDict, istr
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.client import UpstreamClient
from gateway.config import Settings
from gateway.edge import EdgeGuard
from gateway.metrics import GatewayMetrics
from gateway.pool import HealthProber, Pool, Replica
from gateway.ratelimit import RateLimiter
from kit.loopwatch import LoopWatch
from kit.pools import REDIS_DRIVER, redis_reconnects
from kit.security import KeySource, TokenVerifier
from kit.tasks import cancel_and_wait, every

logger = logging.getLogger("gateway.runtime")

ROUTE_NAMES = ("auth", "catalog", "chat")
METRICS_FLUSH_SECONDS = 1.0
"""How often the request path's tally goes into the metrics (gateway.metrics)."""


class ForwardedRequest(aiohttp.ClientRequest):
    """The gateway's own requests (probes, OpenAPI documents) add none of
    aiohttp's default headers: a default `Accept-Encoding` would have the
    upstream compress what the session does not decompress."""

    DEFAULT_HEADERS: dict[istr, str] = {}  # noqa: RUF012 - aiohttp reads the class's
    _skip_auto_headers = CIMultiDict({hdrs.CONTENT_TYPE: None})

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        return


@dataclass(eq=False, slots=True)
class Route:
    """One path prefix and the pool serving it; `/catalog` goes to catalog as is."""

    name: str
    pool: Pool
    timeout_seconds: float

    @property
    def template(self) -> str:
        """The route in access logs and span names: the prefix, as in `/catalog`."""
        return f"/{self.name}"


def route_for(routes: Mapping[str, Route], path: str) -> Route | None:
    """The route of a request's path: its first segment names the service
    (`/catalog/products/7` is catalog's), whatever follows."""
    return routes.get(path[1:].partition("/")[0])


def build_routes(
    settings: Settings, *, stalled: Callable[[], bool] = lambda: False
) -> dict[str, Route]:
    upstreams = {
        "auth": (settings.auth_upstream, settings.auth_timeout_seconds),
        "catalog": (settings.catalog_upstream, settings.catalog_timeout_seconds),
        "chat": (settings.chat_upstream, settings.chat_timeout_seconds),
    }
    routes: dict[str, Route] = {}
    for name, (urls, timeout_seconds) in upstreams.items():
        targets = [(str(url.host), url.port or 80) for url in urls]
        pool = Pool(
            name,
            targets,
            eject_after_failures=settings.eject_after_failures,
            eject_seconds=settings.eject_seconds,
            probing=settings.health_check_interval_seconds > 0,
            probe_failures=settings.health_check_failures,
            busy_grace_seconds=settings.health_check_interval_seconds
            + settings.health_check_timeout_seconds,
            stalled=stalled,
        )
        routes[name] = Route(name, pool, timeout_seconds)
    return routes


class Runtime:
    client: UpstreamClient
    session: aiohttp.ClientSession
    http: httpx.AsyncClient
    redis: Redis
    verifier: TokenVerifier
    limiter: RateLimiter | None
    prober: HealthProber

    def __init__(self, settings: Settings, *, key_source: KeySource | None = None) -> None:
        self.settings = settings
        self.key_source = key_source
        # a timeout that fired while this worker's loop ran late is no verdict
        # on a replica: the watch's window covers the longest such timeout
        self.loop_watch = LoopWatch(
            window=max(settings.connect_timeout_seconds, settings.health_check_timeout_seconds)
            + 1.0
        )
        self.routes = build_routes(settings, stalled=self.loop_watch.stalled)
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(
            self.registry, lambda: [route.pool for route in self.routes.values()]
        )
        self.loop_watch.observe = self.metrics.loop_lag.observe
        self.edge = EdgeGuard(
            header_timeout_seconds=settings.header_timeout_seconds,
            body_idle_timeout_seconds=settings.body_idle_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
            max_connections_per_client=settings.max_connections_per_client,
            on_refusal=self.metrics.edge_refused,
        )
        for route in self.routes.values():
            route.pool.ejections = self.metrics.ejections.labels(route.name).inc
        # open WebSocket relays, closed with 1012 when the gateway stops
        self.websockets: set[Callable[[], Awaitable[None]]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        # proxied requests: the gateway's own keep-alive client (gateway.client)
        self.client = UpstreamClient(connect_timeout=settings.connect_timeout_seconds)
        # the gateway's own requests (probes, OpenAPI documents)
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=30, enable_cleanup_closed=False
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            request_class=ForwardedRequest,
            # a shared jar would hand one user's cookies to the next
            cookie_jar=aiohttp.DummyCookieJar(),
            # bodies pass through as the upstream encoded them
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=settings.connect_timeout_seconds
            ),
            read_bufsize=2**16,
        )
        self.http = httpx.AsyncClient(timeout=10.0)
        self.redis = Redis.from_url(
            str(settings.redis_url),
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
            driver_info=REDIS_DRIVER,
            **redis_reconnects(),
        )
        self.verifier = TokenVerifier.for_service(
            settings, redis=self.redis, keys=self.key_source, http=self.http
        )
        self.limiter = None
        if settings.rate_limit_enabled:
            self.limiter = RateLimiter(
                self.redis,
                anonymous_limit=settings.rate_limit_anonymous,
                user_limit=settings.rate_limit_user,
                window_seconds=settings.rate_limit_window_seconds,
                sync_seconds=settings.rate_limit_sync_seconds,
                metrics=self.metrics,
            )
        self.prober = HealthProber(
            self.session,
            path=settings.health_check_path,
            timeout_seconds=settings.health_check_timeout_seconds,
        )
        self._tasks.append(asyncio.create_task(self.loop_watch.run()))
        self._tasks.append(asyncio.create_task(self._flush_metrics()))
        # the first membership and probe round before the first request
        await asyncio.gather(*(self.discover(route.pool) for route in self.routes.values()))
        for route in self.routes.values():
            if route.pool.uses_dns:
                self._tasks.append(asyncio.create_task(self._rediscover(route.pool)))
            if settings.health_check_interval_seconds > 0:
                self._tasks.append(asyncio.create_task(self._probe_periodically(route.pool)))

    async def discover(self, pool: Pool) -> None:
        added = await pool.refresh()
        if added and self.settings.health_check_interval_seconds > 0:
            await self.prober.probe_all(pool, added)

    async def replica_for(self, route: Route, tried: Collection[Replica]) -> Replica:
        """The replica to send a request to, or a 503: when none is live, the
        pool is looked at again first, waiting at most a connection timeout."""
        pool = route.pool
        replica = pool.choose(tried)
        if replica is not None:
            return replica
        probe = None
        if self.settings.health_check_interval_seconds > 0:
            probe = functools.partial(self.prober.probe_all, pool)
        await pool.look_again(probe, within=self.settings.connect_timeout_seconds)
        return pool.choose_or_refuse(tried, service=route.name)

    async def _rediscover(self, pool: Pool) -> None:
        while True:
            # every interval, or as soon as a connection to the pool failed
            # asyncio.timeout: wait_for (Python 3.11) could lose the stop's
            # cancellation as the pool went stale, and the stop then waited for good
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.dns_refresh_seconds):
                    await pool.stale.wait()
            try:
                await self.discover(pool)
            except Exception:
                logger.exception("%s pool: discovery failed", pool.name)

    async def _probe_periodically(self, pool: Pool) -> None:
        await every(
            self.settings.health_check_interval_seconds,
            lambda: self.prober.probe_all(pool),
            log=logger,
            failed=f"{pool.name} pool: health probes failed",
            traceback=True,
        )

    async def _flush_metrics(self) -> None:
        async def flush() -> None:
            self.metrics.flush()

        await every(
            METRICS_FLUSH_SECONDS,
            flush,
            log=logger,
            failed="adding the request path's counts to the metrics failed",
            traceback=True,
        )

    async def stop(self) -> None:
        # all at once, and never for good on a lost cancellation
        await asyncio.gather(*(cancel_and_wait(task) for task in self._tasks))
        self._tasks.clear()
        self.metrics.flush()
        if self.limiter is not None:
            await self.limiter.close()
        for route in self.routes.values():
            await route.pool.stop_looking()
        # Sockets still open (a server that does not close them itself): 1012,
        # "service restart", so clients reconnect, through another gateway.
        await asyncio.gather(*(close() for close in list(self.websockets)), return_exceptions=True)
        self.client.close()
        await self.session.close()
        await self.http.aclose()
        await self.redis.aclose()
