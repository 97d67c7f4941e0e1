"""Prometheus series for the edge: requests by route prefix and status, upstream
latency, pool membership, rate-limit refusals and Redis outages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.pool import Pool
from kit.metrics import HttpMetrics

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class PoolCollector(Collector):
    """Pool membership read at scrape time, so the request path never updates a gauge."""

    def __init__(self, pools: Callable[[], Sequence[Pool]]) -> None:
        self.pools = pools

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gateway_upstream_replicas",
            "Replicas per upstream pool by state (available, ejected, unhealthy, down)",
            labels=["route", "state"],
        )
        panic = GaugeMetricFamily(
            "gateway_upstream_panic",
            "1 while fewer than half of a pool's live replicas are healthy and all take traffic",
            labels=["route"],
        )
        for pool in self.pools():
            for state, count in pool.states().items():
                family.add_metric([pool.name, state], count)
            panic.add_metric([pool.name], float(pool.panicking()))
        yield family
        yield panic


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, pools: Callable[[], Sequence[Pool]]) -> None:
        self.registry = registry
        # the same families the services export, with the route prefix as `route`
        self.http = HttpMetrics(registry)
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from sending a request upstream to its response head",
            ["route"],
            registry=registry,
        )
        self.retries = Counter(
            "gateway_upstream_retries_total",
            "Requests sent again to another replica after a failed connection",
            ["route"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused with 429, by who was limited (anonymous, user)",
            ["client"],
            registry=registry,
        )
        self.rate_limit_local = Counter(
            "gateway_rate_limit_local_total",
            "Requests counted by this process's own limiter because Redis could not count them",
            registry=registry,
        )
        self.edge_refusals = Counter(
            "gateway_edge_refusals_total",
            "Connections the edge cut off or refused, by reason (too_many_connections,"
            " header_timeout, body_timeout, header_too_large)",
            ["reason"],
            registry=registry,
        )
        registry.register(PoolCollector(pools))
        self._requests: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._latency: dict[tuple[str, str], Callable[[float], None]] = {}
        self._upstream: dict[str, Callable[[float], None]] = {}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Counts one proxied request; label children are looked up once per combination."""
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        counter = self._requests.get((route, method, status))
        if counter is None:
            counter = self.http.requests.labels(route, method, str(status)).inc
            self._requests[(route, method, status)] = counter
        counter()
        observe = self._latency.get((route, method))
        if observe is None:
            observe = self.http.latency.labels(route, method).observe
            self._latency[(route, method)] = observe
        observe(seconds)

    def edge_refused(self, reason: str) -> None:
        self.edge_refusals.labels(reason).inc()

    def upstream(self, route: str, seconds: float) -> None:
        observe = self._upstream.get(route)
        if observe is None:
            observe = self._upstream[route] = self.upstream_latency.labels(route).observe
        observe(seconds)
