"""The gateway app: `create_app()` builds it; the lifespan opens every resource.

The outermost layers are kit's pure-ASGI middleware (request id, tracing when
on, access log, timing, trusted hosts), then CORS and GZip. Under them a dispatcher sends `/auth`,
`/catalog` and `/chat` (HTTP and WebSocket) to the proxy, a plain ASGI
handler, and everything else to the gateway's own FastAPI app (`/healthz`,
`/readyz`, `/metrics`, `/openapi.json`, `/docs`, RFC 8414's root well-known
path for auth's metadata, and the web client at `/`), whose every response
carries the page security headers (`webapp`).

A proxied request without a body skips the layers above CORS: the edge
protocol starts it on the direct path (`gateway.direct`), which does their
work itself and calls the layer under CORS.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypedDict

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from redis.asyncio import Redis
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Settings
from gateway.direct import DirectPath
from gateway.headers import ClientFromTrustedProxy
from gateway.openapi import MergedOpenApi
from gateway.proxy import Proxy
from gateway.router import docs_router, well_known_router
from gateway.runtime import Route, Runtime, route_for
from gateway.webapp import SecurityHeaders, install_web
from gateway.websocket import WebSocketProxy
from kit.accesslog import AccessLogMiddleware
from kit.errors import install_problem_handlers
from kit.health import VERIFIER_CHECKS, Degraded, health_router
from kit.heap import settled_heap
from kit.logs import configure_logging
from kit.metrics import MetricsMiddleware, exposed, metrics_router
from kit.middleware import RequestIdMiddleware, TimingMiddleware, TrustedHostMiddleware
from kit.observe import ROUTE_TEMPLATE_KEY
from kit.openapi import describe_problems
from kit.security import KeySource, TokenVerifier
from kit.tracing import TracingMiddleware, configure_tracing

logger = logging.getLogger("gateway.main")
TITLE = "Bazaar API"
EXPOSED_HEADERS = [
    "X-Request-ID",
    "X-Process-Time",
    "ETag",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
]


class State(TypedDict):
    settings: Settings
    redis: Redis
    verifier: TokenVerifier
    runtime: Runtime


class Dispatcher:
    """Routes by the first path segment; nothing is rewritten."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        proxy: Proxy,
        websockets: WebSocketProxy,
        api: ASGIApp,
    ) -> None:
        self.routes = dict(routes)
        self.proxy = proxy
        self.websockets = websockets
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            route = route_for(self.routes, scope["path"])
            if route is not None:
                scope[ROUTE_TEMPLATE_KEY] = route.template
                if kind == "http":
                    await self.proxy(route, scope, receive, send)
                else:
                    await self.websockets(route, scope, receive, send)
                return
        await self.api(scope, receive, send)


class GZipWhenAccepted:
    """GZip only for clients that accept it; others skip the wrapper entirely.

    Starlette's GZipMiddleware skips text/event-stream and already-encoded
    bodies; WebSockets never reach it.
    """

    def __init__(self, app: ASGIApp, *, minimum_size: int = 1024) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size, compresslevel=6)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"accept-encoding":
                    if b"gzip" in value:
                        await self.gzip(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class Gateway:
    """The ASGI app uvicorn runs; `runtime` and `api` are there for tests.

    A WebSocket to a proxied path skips the layers that only HTTP needs
    (timing, CORS, GZip, the dispatcher): every layer a socket passes keeps a
    frame for as long as the relay lives. It passes the request id, the server
    span when tracing is on and the access log, then the host check, which
    hands it to the relay without keeping a frame of its own."""

    def __init__(self, settings: Settings, *, key_source: KeySource | None = None) -> None:
        self.settings = settings
        # before the runtime's client session exists: the instrumentation hooks its creation
        tracing = configure_tracing(settings)
        self.runtime = runtime = Runtime(settings, key_source=key_source)
        self.api = build_api(runtime)
        proxy = Proxy(runtime)
        self.websockets = WebSocketProxy(runtime, proxy)
        dispatcher = Dispatcher(
            runtime.routes,
            proxy=proxy,
            websockets=self.websockets,
            api=MetricsMiddleware(SecurityHeaders(self.api), metrics=runtime.metrics.http),
        )
        below_cors: ASGIApp = GZipWhenAccepted(dispatcher)
        app = below_cors
        if settings.cors_origins:
            app = CORSMiddleware(
                app,
                allow_origins=settings.cors_origins,
                # credentials never go with a wildcard origin
                allow_credentials="*" not in settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        self.hosts = app = TrustedHostMiddleware(app, allowed_hosts=settings.trusted_hosts)
        app = TimingMiddleware(app)
        app = access_log = AccessLogMiddleware(app)
        if tracing:
            app = TracingMiddleware(app)
        self.app: ASGIApp = RequestIdMiddleware(app)
        socket: ASGIApp = AccessLogMiddleware(self._relay)
        if tracing:
            socket = TracingMiddleware(socket)
        self.sockets: ASGIApp = RequestIdMiddleware(socket)
        if settings.trust_forwarded_headers:
            self.app = ClientFromTrustedProxy(self.app)
            self.sockets = ClientFromTrustedProxy(self.sockets)
        # for a proxied request without a body, the direct path does the work
        # of the layers above CORS itself (gateway.direct); with tracing on
        # there is none, so every request gets its server span the one way
        self.direct = (
            None
            if tracing
            else DirectPath(
                routes=runtime.routes,
                app=below_cors,
                hosts=self.hosts,
                access_log=access_log,
                cors=bool(settings.cors_origins),
                trust_forwarded=settings.trust_forwarded_headers,
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self._route(scope) is not None:
            await self.sockets(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> Route | None:
        return route_for(self.runtime.routes, scope["path"])

    def _relay(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The host check, then the relay's own coroutine, returned rather than
        awaited: this layer keeps no frame for the socket's life."""
        hosts = self.hosts
        if not hosts.allow_any and not hosts.is_allowed(Headers(scope=scope).get("host", "")):
            return send({"type": "websocket.close", "code": 1008, "reason": "Invalid host"})
        route = self._route(scope)
        assert route is not None
        scope[ROUTE_TEMPLATE_KEY] = route.template
        return self.websockets(route, scope, receive, send)


async def check_rate_limits(request: Request) -> None:
    limiter = request.state.runtime.limiter
    if limiter is not None and limiter.counting_locally:
        raise Degraded(limiter.describe())


def build_api(runtime: Runtime) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        await runtime.start()
        await runtime.verifier.start()
        try:
            with settled_heap():
                yield State(
                    settings=runtime.settings,
                    redis=runtime.redis,
                    verifier=runtime.verifier,
                    runtime=runtime,
                )
        finally:
            await runtime.verifier.aclose()
            await runtime.stop()

    api = FastAPI(
        title="Bazaar gateway",
        lifespan=lifespan,
        # the gateway's own TracingMiddleware spans these requests already
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_problem_handlers(api)
    # Ready whenever the process runs: proxying needs no dependency of its own.
    # Without Redis, limits are counted per process and revocations come from
    # the local mirror for a while; without auth, the cached keys verify.
    api.include_router(
        health_router({}, optional={**VERIFIER_CHECKS, "rate_limits": check_rate_limits})
    )
    # with several workers, a scrape reports them all (kit.metrics.AcrossWorkers);
    # the answering worker's tally goes in first
    api.include_router(
        metrics_router(
            exposed(runtime.registry),
            samplers=(lambda state: runtime.metrics.flush(), runtime.metrics.pools.sample),
        )
    )

    def own_spec() -> dict[str, Any]:
        return describe_problems(get_openapi(title=api.title, version="1", routes=api.routes))

    api.include_router(docs_router(MergedOpenApi(runtime, own_spec, title=TITLE)))
    api.include_router(well_known_router())
    install_web(api)
    return api


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> Gateway:
    """`key_source` replaces the JWKS for token verification (tests)."""
    settings = settings or Settings()
    configure_logging(
        service=settings.service_name,
        level=settings.log_level,
        log_format=settings.log_format,
        access_log=settings.access_log,
        flush_seconds=settings.log_flush_seconds,
    )
    return Gateway(settings, key_source=key_source)
