"""Prometheus series for the edge: requests by route prefix and status, upstream
requests, latency, retries, ejections and requests in flight per upstream, pool
membership, rate-limit refusals and Redis outages.

Every series labelled by upstream exists from the start (at 0) for each route,
so dashboards and alerts see a zero rather than no data.

What every proxied request counts (its request, its latency, its upstream's
answer and latency) is tallied in plain numbers and added to the series by
`flush`: every second, before a scrape and when the worker stops. With
several workers every update of a series is a locked write to a file they
share (kit.metrics.AcrossWorkers), about 1 µs, and a request made six; the
tally costs a request under a microsecond. Another worker's counts reach a
scrape up to a second late, and a worker killed outright loses at most its
last second of them."""

from __future__ import annotations

from bisect import bisect_left
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


class Observed:
    """Observations of one histogram child not yet added to it."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # the first bucket whose bound is >= value, as Histogram.observe picks
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


def add_observed(child: Histogram, observed: Observed) -> None:
    """Adds what `observed` holds to `child`, as that many `observe` calls
    would. prometheus_client has no call for many at once, so its bucket and
    sum values are added to directly (a test checks this against `observe`)."""
    child._sum.inc(observed.total)
    for bucket, count in zip(child._buckets, observed.counts, strict=True):
        if count:
            bucket.inc(count)


class Tally:
    """Counts and observations of the request path, kept until `flush`."""

    def __init__(self) -> None:
        self.counts: dict[Counter, int] = {}
        self.observed: dict[Histogram, Observed] = {}

    def count(self, child: Counter) -> None:
        counts = self.counts
        counts[child] = counts.get(child, 0) + 1

    def observe(self, child: Histogram, value: float) -> None:
        observed = self.observed.get(child)
        if observed is None:
            observed = self.observed[child] = Observed(child._upper_bounds)
        observed.observe(value)

    def flush(self) -> None:
        counts, self.counts = self.counts, {}
        for child, count in counts.items():
            child.inc(count)
        observed, self.observed = self.observed, {}
        for histogram, pending in observed.items():
            add_observed(histogram, pending)


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
        # label children looked up once per combination
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        self._upstream: dict[str, Histogram] = {}
        self._outcomes: dict[tuple[str, str], Counter] = {}
        self.tally = Tally()

    def flush(self) -> None:
        """Adds what the request path tallied to the series."""
        self.tally.flush()

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
            "WebSocket upgrades waiting for a handshake slot",
            registry=registry,
            multiprocess_mode="livesum",  # summed over the workers
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
        """Counts one proxied request."""
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        counter = self._requests.get((route, method, status))
        if counter is None:
            counter = self.http.requests.labels(route, method, str(status))
            self._requests[(route, method, status)] = counter
        self.tally.count(counter)
        latency = self._latency.get((route, method))
        if latency is None:
            latency = self._latency[(route, method)] = self.http.latency.labels(route, method)
        self.tally.observe(latency, seconds)

    def edge_refused(self, reason: str) -> None:
        self.edge_refusals.labels(reason).inc()

    def upstream(self, route: str, seconds: float, status: int | None = None) -> None:
        """One upstream answer (its head after `seconds`); `status` None: no answer."""
        if status is not None:
            latency = self._upstream.get(route)
            if latency is None:
                latency = self._upstream[route] = self.upstream_latency.labels(route)
            self.tally.observe(latency, seconds)
        outcome = "error" if status is None else _STATUS_CLASSES.get(status // 100, "error")
        counter = self._outcomes.get((route, outcome))
        if counter is None:
            counter = self._outcomes[(route, outcome)] = self.upstream_requests.labels(
                route, outcome
            )
        self.tally.count(counter)


_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
