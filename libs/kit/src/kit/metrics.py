"""Prometheus metrics: a pure-ASGI middleware that counts requests by route
template, the process's own series (CPU, memory, file descriptors, garbage
collections), and `/metrics`, behind HTTP Basic when credentials are configured."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.errors import Unauthenticated
from kit.settings import ServiceSettings

_basic = HTTPBasic(auto_error=False)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to the response head, by route template",
            ["route", "method"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight", "Requests being handled right now", registry=registry
        )
        # process_* (CPU, memory, open files), python_gc_*, python_info: the
        # process-wide collectors, in this app's registry too
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            registry.register(collector)


def route_template(scope: Scope) -> str:
    """The matched route's path template, so `/products/{id}` is one series, not millions.

    The router leaves the route it dispatched to in `scope["route"]` (also for a
    405, where the method is not the route's); the loop is for scopes without it.
    """
    route = scope.get("route")
    if route is not None:
        methods = getattr(route, "methods", None)
        if methods is None or scope.get("method") in methods:
            return str(getattr(route, "path", "unmatched"))
        return "unmatched"
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = route_template(scope)
                self.metrics.latency.labels(route, scope["method"]).observe(
                    time.perf_counter() - started
                )
                self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            self.metrics.in_flight.dec()


def require_metrics_credentials(
    request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
) -> None:
    settings: ServiceSettings = request.state.settings
    if settings.metrics_user is None or settings.metrics_password is None:
        return
    if credentials is None:
        raise Unauthenticated("Metrics need HTTP Basic credentials", scheme="Basic")
    # compare_digest over bytes: the time taken does not reveal how much matched
    user_ok = secrets.compare_digest(credentials.username.encode(), settings.metrics_user.encode())
    password_ok = secrets.compare_digest(
        credentials.password.encode(), settings.metrics_password.get_secret_value().encode()
    )
    if not (user_ok and password_ok):
        raise Unauthenticated("Wrong metrics credentials", scheme="Basic")


Sampler = Callable[[Any], None]
"""Reads gauges from the app's state (its pools) just before a scrape."""


def metrics_router(registry: CollectorRegistry, samplers: tuple[Sampler, ...] = ()) -> APIRouter:
    router = APIRouter(tags=["metrics"], include_in_schema=False)

    @router.get("/metrics", dependencies=[Depends(require_metrics_credentials)])
    async def metrics(request: Request) -> Response:
        for sample in samplers:
            sample(request.state)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
