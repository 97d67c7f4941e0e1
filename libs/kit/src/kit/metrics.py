"""Prometheus metrics: a pure-ASGI middleware that counts requests by route
template, the process's own series (CPU, memory, file descriptors, garbage
collections), and `/metrics`, behind HTTP Basic when credentials are configured.

A server whose worker processes all serve one port (the gateway) has any of
them answer a scrape. With `PROMETHEUS_MULTIPROC_DIR` set, each worker
keeps its counts in that directory, and the answering worker reports them
all (`AcrossWorkers`)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
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
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
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
            "http_requests_in_flight",
            "Requests being handled right now",
            registry=registry,
            # with several workers: the sum over the live ones (AcrossWorkers)
            multiprocess_mode="livesum",
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


WORKERS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
_SUMMED = frozenset({"counter", "histogram"})
_GROWING = frozenset({"counter", "histogram", "summary"})


class AcrossWorkers(Collector):
    """What a scrape reports for a server of several worker processes, any of
    which may answer it (prometheus_client's multiprocess mode: each worker's
    counts in a file of its own in `directory`):

    - counters and histograms: summed over every worker that ran, a dead
      one's counts kept, so a series never goes back when the next scrape
      reaches another worker or a worker is replaced;
    - gauges declared with a summing `multiprocess_mode` ("livesum"): summed
      over the live workers, a dead one's dropped;
    - everything else is the answering worker's own, read now: gauges set
      at scrape time (pool sizes), what custom collectors report. Its own
      counters among them (process CPU, garbage collections) carry its `pid`,
      so that each worker's series only grows.
    """

    def __init__(self, registry: CollectorRegistry, directory: str | Path) -> None:
        self.registry = registry
        self.directory = str(directory)

    def collect(self) -> Iterable[Metric]:
        forget_dead_workers(self.directory)
        shared: dict[str, Metric] = {}
        for family in MultiProcessCollector(None, self.directory).collect():
            # a gauge left per process ("all", the default) has a pid label
            if family.type in _SUMMED or (
                family.type == "gauge" and not any("pid" in s.labels for s in family.samples)
            ):
                shared[family.name] = family
        yield from shared.values()
        pid = str(os.getpid())
        for family in self.registry.collect():
            if family.name in shared:
                continue
            if family.type in _GROWING:
                family = _with_label(family, "pid", pid)
            yield family


def _with_label(family: Metric, name: str, value: str) -> Metric:
    labelled = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        labelled.add_sample(
            sample.name, {**sample.labels, name: value}, sample.value, sample.timestamp
        )
    return labelled


def forget_dead_workers(directory: str) -> None:
    """Drops the live-summed gauges of workers that have exited."""
    for file in Path(directory).glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    return True


def exposed(registry: CollectorRegistry) -> CollectorRegistry:
    """What `/metrics` reports: `registry`, or, with `PROMETHEUS_MULTIPROC_DIR`
    set (several workers), every worker's counts through `AcrossWorkers`."""
    directory = os.environ.get(WORKERS_DIRECTORY)
    if not directory:
        return registry
    across = CollectorRegistry()
    across.register(AcrossWorkers(registry, directory))
    return across


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
