"""A scrape of a server with several workers reports every worker's counts
(`kit.metrics.AcrossWorkers`), read from the files prometheus_client's
multiprocess mode keeps: here written as two workers would have, one of them
gone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from kit.metrics import WORKERS_DIRECTORY, AcrossWorkers, exposed


def a_dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write(directory: Path, kind: str, pid: int, values: dict[tuple[str, str], float]) -> None:
    """One worker's file of `kind` (counter, histogram, gauge_livesum, ...):
    (sample, label value) -> value; every sample labelled `route`."""
    file = MmapedDict(str(directory / f"{kind}_{pid}.db"))
    for (sample, route), value in values.items():
        family = sample.removesuffix("_total").removesuffix("_bucket")
        family = family.removesuffix("_count").removesuffix("_sum")
        key = mmap_key(family, sample, ["route"], [route], "help")
        file.write_value(key, value, 0.0)
    file.close()


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counts_of_every_worker_are_summed_a_dead_ones_kept_and_its_gauges_dropped(
    tmp_path: Path,
) -> None:
    alive, dead = os.getpid(), a_dead_pid()
    write(tmp_path, "counter", alive, {("requests_total", "catalog"): 3})
    write(tmp_path, "counter", dead, {("requests_total", "catalog"): 5})
    write(tmp_path, "gauge_livesum", alive, {("in_flight", "catalog"): 1})
    write(tmp_path, "gauge_livesum", dead, {("in_flight", "catalog"): 7})
    # a gauge kept per process (the default mode): each worker's own is reported
    write(tmp_path, "gauge_all", dead, {("pool_connections", "redis"): 9})

    # the answering worker's own registry: a gauge set at scrape time and a
    # counter of a custom collector (as process_cpu_seconds_total is)
    registry = CollectorRegistry()
    Gauge("pool_connections", "help", ["route"], registry=registry).labels("redis").set(2)
    Counter("own_cpu_seconds", "help", registry=registry).inc(4)
    across = CollectorRegistry()
    across.register(AcrossWorkers(registry, tmp_path))

    seen = samples(across)
    assert seen[("requests_total", frozenset({("route", "catalog")}))] == 8
    assert seen[("in_flight", frozenset({("route", "catalog")}))] == 1
    assert seen[("pool_connections", frozenset({("route", "redis")}))] == 2
    assert seen[("own_cpu_seconds_total", frozenset({("pid", str(alive))}))] == 4
    assert not (tmp_path / f"gauge_livesum_{dead}.db").exists()
    # the dead worker's counts stay: a counter never goes back
    assert (tmp_path / f"counter_{dead}.db").exists()


def test_histograms_are_summed_bucket_by_bucket(tmp_path: Path) -> None:
    for pid, (fast, slow) in ((os.getpid(), (2, 1)), (a_dead_pid(), (4, 0))):
        file = MmapedDict(str(tmp_path / f"histogram_{pid}.db"))
        for bound, count in (("0.1", fast), ("+Inf", slow)):
            key = mmap_key("latency", "latency_bucket", ["le"], [bound], "help")
            file.write_value(key, count, 0.0)
        file.write_value(mmap_key("latency", "latency_sum", [], [], "help"), 0.5, 0.0)
        file.close()
    across = CollectorRegistry()
    across.register(AcrossWorkers(CollectorRegistry(), tmp_path))

    seen = samples(across)
    assert seen[("latency_bucket", frozenset({("le", "0.1")}))] == 6
    assert seen[("latency_bucket", frozenset({("le", "+Inf")}))] == 7  # cumulative
    assert seen[("latency_count", frozenset())] == 7
    assert seen[("latency_sum", frozenset())] == 1.0


def test_without_a_workers_directory_the_registry_is_reported_as_it_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    monkeypatch.delenv(WORKERS_DIRECTORY, raising=False)
    assert exposed(registry) is registry
    monkeypatch.setenv(WORKERS_DIRECTORY, str(tmp_path))
    assert exposed(registry) is not registry
