"""The request path's tally (`gateway.metrics.Tally`): once flushed, the series
read as if every count and observation had gone to them one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import Tally

VALUES = (0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 10.0, 11.0, 0.005)


def series(registry: CollectorRegistry) -> list[str]:
    # `_created` is when each series was made, never the same twice
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#") and "_created" not in line
    ]


def test_a_flushed_tally_reads_as_counting_and_observing_one_by_one() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    families = {
        registry: (
            Counter("requests", "help", ["route"], registry=registry),
            Histogram("latency_seconds", "help", ["route"], registry=registry),
        )
        for registry in (direct, tallied)
    }

    def children(registry: CollectorRegistry, route: str) -> tuple[Counter, Histogram]:
        counter, histogram = families[registry]
        return counter.labels(route), histogram.labels(route)

    tally = Tally()
    for route in ("catalog", "auth"):
        counter, histogram = children(direct, route)
        tallied_counter, tallied_histogram = children(tallied, route)
        for value in VALUES:
            counter.inc()
            histogram.observe(value)
            tally.count(tallied_counter)
            tally.observe(tallied_histogram, value)
    # nothing reaches the series before the flush
    assert 'requests_total{route="catalog"} 0.0' in series(tallied)
    tally.flush()
    assert series(tallied) == series(direct)
    assert 'requests_total{route="catalog"} 9.0' in series(tallied)
    # a second flush adds only what came since
    tally.flush()
    assert series(tallied) == series(direct)
