"""Replica pools: DNS discovery, least-in-flight choice, passive and active health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from pydantic import ValidationError

from gateway.config import Settings
from gateway.pool import Pool
from kit.testing import TokenMinter

from .conftest import dead_url, gateway_settings, running_gateway, running_upstream, urls


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def make_pool(*targets: tuple[str, int], probing: bool = False) -> Pool:
    return Pool("catalog", targets, eject_after_failures=2, eject_seconds=30, probing=probing)


async def test_resolves_host_names_to_every_address() -> None:
    pool = make_pool(("localhost", 8000), ("127.0.0.1", 8000), ("127.0.0.2", 9000))
    assert pool.uses_dns
    added = await pool.refresh()
    addresses = [(replica.address, replica.port) for replica in pool.replicas]
    assert ("127.0.0.1", 8000) in addresses
    assert ("127.0.0.2", 9000) in addresses
    assert len(addresses) == len(set(addresses)) == len(added)
    # a second resolution keeps the same replica objects (and their state)
    pool.replicas[0].in_flight = 3
    assert await pool.refresh() == []
    assert pool.replicas[0].in_flight == 3


async def test_keeps_the_last_membership_when_dns_fails() -> None:
    pool = make_pool(("127.0.0.1", 8000))
    await pool.refresh()
    pool.targets.append(("no-such-host.invalid", 8000))
    assert await pool.refresh() == []
    assert [(r.address, r.port) for r in pool.replicas] == [("127.0.0.1", 8000)]


async def test_chooses_the_replica_with_fewest_requests_in_flight() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80))
    await pool.refresh()
    first, second, third = pool.replicas
    first.in_flight, second.in_flight, third.in_flight = 4, 1, 2
    assert pool.choose() is second
    assert pool.choose(tried=[second]) is third
    # ties rotate, so idle replicas share the load
    first.in_flight = second.in_flight = third.in_flight = 0
    assert {pool.choose() for _ in range(3)} == {first, second, third}


async def test_ejects_after_failures_and_on_refused_connections() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80))
    await pool.refresh()
    first, second = pool.replicas
    pool.failed(first)
    pool.succeeded(first)
    pool.failed(first)
    assert pool.choose(tried=[second]) is first  # a success broke the streak
    pool.failed(first)
    assert pool.choose(tried=[second]) is None
    pool.failed(second, unreachable=True)
    assert pool.choose() is None
    assert 29 <= pool.retry_after() <= 30


async def test_new_replicas_wait_for_a_probe_when_probing() -> None:
    pool = make_pool(("10.0.0.1", 80), probing=True)
    await pool.refresh()
    assert pool.choose() is None


async def test_ejects_a_failing_replica_and_takes_it_back(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_upstream("one") as (service, base_url):
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(base_url),
            eject_after_failures=2,
            eject_seconds=0.3,
        )
        async with running_gateway(settings, minter) as (_, client):
            service.failing = True
            failures = [(await client.get("/catalog/flaky")).status_code for _ in range(2)]
            ejected = await client.get("/catalog/flaky")
            metrics = (await client.get("/metrics")).text
            service.failing = False

            async def back() -> bool:
                return (await client.get("/catalog/flaky")).status_code == 200

            await eventually(back)
    assert failures == [500, 500]
    assert ejected.status_code == 503
    assert ejected.json()["detail"] == "No catalog replica is available"
    assert 'gateway_upstream_replicas{route="catalog",state="ejected"} 1.0' in metrics
    assert service.hits >= 3


async def test_probes_readiness_and_routes_around_unready_replicas(
    redis_url: str, minter: TokenMinter
) -> None:
    async with (
        running_upstream("one") as (_first, first_url),
        running_upstream("two") as (second, second_url),
    ):
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(first_url, second_url, dead_url()),
            health_check_interval_seconds=0.05,
        )
        async with running_gateway(settings, minter) as (app, client):
            pool = app.runtime.routes["catalog"].pool
            assert sum(replica.healthy for replica in pool.replicas) == 2
            second.ready = False

            async def only_first() -> bool:
                return [r.healthy for r in pool.replicas] == [True, False, False]

            await eventually(only_first)
            nodes = {(await client.get("/catalog/echo")).json()["node"] for _ in range(4)}
            second.ready = True

            async def both() -> bool:
                return [r.healthy for r in pool.replicas] == [True, True, False]

            await eventually(both)
    assert nodes == {"one"}


def test_reads_pools_from_comma_separated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_UPSTREAM", "http://10.0.0.1:8000, http://catalog:9000")
    settings = Settings()
    assert [(u.host, u.port) for u in settings.catalog_upstream] == [
        ("10.0.0.1", 8000),
        ("catalog", 9000),
    ]
    assert [str(u) for u in settings.auth_upstream] == ["http://auth:8000/"]
    monkeypatch.setenv("CATALOG_UPSTREAM", "http://catalog:8000/prefix")
    with pytest.raises(ValidationError, match="paths are never rewritten"):
        Settings()
