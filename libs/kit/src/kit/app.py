"""The parts every FastAPI app here is assembled from, in one place."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from kit.accesslog import AccessLogMiddleware
from kit.errors import DomainError, install_problem_handlers
from kit.health import ReadinessCheck, health_router
from kit.inputs import install_screening
from kit.logs import configure_logging
from kit.metrics import HttpMetrics, MetricsMiddleware, metrics_router
from kit.middleware import (
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    TimingMiddleware,
    TrustedHostMiddleware,
)
from kit.openapi import install_problem_openapi
from kit.pools import PoolMetrics
from kit.process import raise_open_file_limit
from kit.settings import ServiceSettings
from kit.tracing import TracingMiddleware, configure_tracing, quiet_fastapi_tracing


def add_common_middleware(
    app: FastAPI, settings: ServiceSettings, registry: CollectorRegistry
) -> HttpMetrics:
    """Installs the shared middleware; returns the HTTP metrics it records into.

    `add_middleware` wraps what is already there, so the last one added runs
    first: request id, tracing (when on), access log, then timing, metrics, host check, CORS, GZip, body limit. Also
    sets the log format and, once per process, tracing (see kit.tracing).
    """
    configure_logging(
        service=settings.service_name,
        level=settings.log_level,
        log_format=settings.log_format,
        access_log=settings.access_log,
        flush_seconds=settings.log_flush_seconds,
    )
    tracing = configure_tracing(settings)
    metrics = HttpMetrics(registry)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            # credentials never go with a wildcard origin
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "X-Process-Time", "ETag", "Retry-After"],
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(TimingMiddleware)
    app.add_middleware(AccessLogMiddleware)
    if tracing:
        quiet_fastapi_tracing(app)
        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return metrics


def assemble(
    app: FastAPI,
    settings: ServiceSettings,
    *,
    readiness: Mapping[str, ReadinessCheck],
    optional_readiness: Mapping[str, ReadinessCheck] | None = None,
    registry: CollectorRegistry | None = None,
    database_outage: Callable[[], DomainError] | None = None,
) -> HttpMetrics:
    """Middleware, input screening, problem+json handlers, `/healthz`,
    `/readyz` and `/metrics` (with the pools of the app's state: see
    kit.pools). Call it before adding the service's own routes.

    `readiness`: what the core traffic needs; `optional_readiness`: what only
    some requests need, reported without failing readiness (see `kit.health`);
    `database_outage`: see `kit.errors.install_problem_handlers`."""
    raise_open_file_limit()
    registry = registry or CollectorRegistry()
    metrics = add_common_middleware(app, settings, registry)
    pools = PoolMetrics(registry)
    # before any route is added: routes take the router's dependencies as they come
    install_screening(app)
    install_problem_handlers(app, database_outage=database_outage)
    install_problem_openapi(app)
    app.include_router(health_router(readiness, optional=optional_readiness))
    app.include_router(metrics_router(registry, samplers=(pools.sample,)))
    return metrics
