"""Prometheus series for the edge: requests by route prefix and status, upstream
requests, latency, retries, ejections and requests in flight per upstream, pool
membership, rate-limit refusals and Redis outages.

Every series labelled by upstream exists from the start (at 0) for each route,
so dashboards and alerts see a zero rather than no data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.pool import Pool
from kit.metrics import HttpMetrics
from kit.pools import PoolMetrics

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

        in_flight = GaugeMetricFamily(
            "gateway_upstream_in_flight",
            "Requests (and WebSocket sessions) open to each upstream",
            labels=["route"],
        )
        for pool in self.pools():
            in_flight.add_metric([pool.name], sum(r.in_flight for r in pool.replicas))
        yield in_flight


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, pools: Callable[[], Sequence[Pool]]) -> None:
        self.registry = registry
        # the same families the services export, with the route prefix as `route`
        self.http = HttpMetrics(registry)
        self._declare_upstream(registry)
        self._declare_edge(registry)
        self.pools = PoolMetrics(registry)
        registry.register(PoolCollector(pools))
        for client in ("anonymous", "user"):
            self.rate_limited.labels(client)
        for pool in pools():
            self.retries.labels(pool.name)
            self.ejections.labels(pool.name)
            for outcome in ("2xx", "3xx", "4xx", "5xx", "error"):
                self.upstream_requests.labels(pool.name, outcome)
        self._requests: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._latency: dict[tuple[str, str], Callable[[float], None]] = {}
        self._upstream: dict[str, Callable[[float], None]] = {}
        self._outcomes: dict[tuple[str, str], Callable[[], None]] = {}

    def _declare_upstream(self, registry: CollectorRegistry) -> None:
        """What the gateway sees of each upstream: latency, outcomes, retries, ejections."""
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
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Requests sent upstream, by route and outcome (the status class, or error)",
            ["route", "outcome"],
            registry=registry,
        )
        self.ejections = Counter(
            "gateway_upstream_ejections_total",
            "Replicas taken out of rotation after failures (passive health)",
            ["route"],
            registry=registry,
        )

    def _declare_edge(self, registry: CollectorRegistry) -> None:
        """What the edge refuses (rate limits, guarded connections, upgrades that
        waited too long), and how late its event loop runs."""
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late this worker's event loop ran a timer due every 100 ms",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.websocket_handshakes_waiting = Gauge(
            "gateway_websocket_handshakes_waiting",
            "WebSocket upgrades waiting for one of this worker's handshake slots",
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
            " header_timeout, body_timeout, header_too_large, too_many_pipelined)",
            ["reason"],
            registry=registry,
        )

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

    def upstream(self, route: str, seconds: float, status: int | None = None) -> None:
        """One upstream answer (its head after `seconds`); `status` None: no answer."""
        if status is not None:
            observe = self._upstream.get(route)
            if observe is None:
                observe = self._upstream[route] = self.upstream_latency.labels(route).observe
            observe(seconds)
        outcome = "error" if status is None else _STATUS_CLASSES.get(status // 100, "error")
        count = self._outcomes.get((route, outcome))
        if count is None:
            count = self._outcomes[(route, outcome)] = self.upstream_requests.labels(
                route, outcome
            ).inc
        count()


_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
