"""Replica pools: DNS discovery, least-in-flight choice, passive and active health."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydantic import ValidationError

from gateway.config import Settings
from gateway.pool import Pool
from kit.errors import ServiceUnavailable
from kit_testing import TokenMinter

from .conftest import (
    GatewayWithALateReplica,
    dead_url,
    eventually,
    gateway_settings,
    running_gateway,
    running_upstream,
    urls,
)
from .upstreams import Upstream


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


async def test_keeps_the_last_membership_when_dns_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool(("catalog.test", 8000))
    pool.update([("10.0.0.1", 8000)])

    async def no_answer(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_answer)
    assert await pool.refresh() == []
    assert [(r.address, r.port) for r in pool.replicas] == [("10.0.0.1", 8000)]


async def test_a_name_with_no_address_left_empties_the_pool() -> None:
    pool = make_pool(("no-such-host.invalid", 8000))
    pool.update([("10.0.0.1", 8000)])
    await pool.refresh()
    assert pool.replicas == []
    with pytest.raises(ServiceUnavailable) as refused:
        pool.choose_or_refuse([], service="catalog")
    assert refused.value.detail == "No catalog replica is available"
    assert refused.value.headers["Retry-After"] == "1"


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


async def test_a_streak_of_sickness_signals_ejects_and_an_answer_breaks_it() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80))
    await pool.refresh()
    first, second = pool.replicas
    pool.failed(first)
    pool.succeeded(first)  # any answer that is not 502/503/504: the replica works
    pool.failed(first)
    assert pool.choose(tried=[second]) is first
    pool.failed(first)
    assert {pool.choose() for _ in range(4)} == {second}
    assert pool.states() == {"available": 1, "ejected": 1, "unhealthy": 0, "down": 0}


async def test_connections_lost_without_a_close_eject_once_and_ask_dns_again() -> None:
    pool = make_pool(("chat.test", 80))
    pool.update([("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)])
    first = pool.replicas[0]
    ejections: list[int] = []
    pool.ejections = lambda: ejections.append(1)
    # a killed replica drops every socket it held at once
    for _ in range(50):
        pool.lost(first)
    assert pool.stale.is_set()
    assert len(ejections) == 1
    assert first not in {pool.choose() for _ in range(6)}


async def test_never_ejects_more_than_half_the_pool() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80))
    await pool.refresh()
    for replica in pool.replicas:
        for _ in range(5 * pool.eject_after_failures):
            pool.failed(replica)
    assert pool.states()["ejected"] == 1
    single = make_pool(("10.0.0.9", 80))
    await single.refresh()
    for _ in range(10):
        single.failed(single.replicas[0])
    assert single.choose() is single.replicas[0]


async def test_a_refused_replica_is_skipped_at_once_and_none_left_is_a_503() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80))
    await pool.refresh()
    first, second = pool.replicas
    pool.unreachable(first)
    assert {pool.choose() for _ in range(3)} == {second}
    pool.unreachable(second)
    assert pool.choose() is None
    assert pool.states()["down"] == 2
    with pytest.raises(ServiceUnavailable) as refused:
        pool.choose_or_refuse([], service="catalog")
    assert 29 <= int(refused.value.headers["Retry-After"]) <= 30


async def test_panics_to_every_live_replica_when_fewer_than_half_are_healthy() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80))
    await pool.refresh()
    first, second, third = pool.replicas
    second.healthy = False
    assert not pool.panicking()
    assert {pool.choose() for _ in range(6)} == {first, third}
    third.healthy = False  # one of three healthy: every live replica takes traffic
    assert pool.panicking()
    assert {pool.choose() for _ in range(6)} == {first, second, third}
    first.healthy = False
    pool.unreachable(third)  # a refused replica stays out even in a panic
    assert {pool.choose() for _ in range(6)} == {first, second}


async def test_new_replicas_wait_for_an_answered_probe_when_probing() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), probing=True)
    await pool.refresh()
    first, second = pool.replicas
    assert pool.choose() is None
    pool.probed(first, ready=None)  # timed out: still not known to listen
    assert pool.choose() is None
    pool.probed(first, ready=False)  # answered "not ready": live, but unhealthy
    assert pool.choose() is first  # the only live replica, so a panic sends to it
    pool.probed(second, ready=True)
    assert {pool.choose() for _ in range(4)} == {second}


async def test_a_busy_replica_needs_consecutive_failed_probes_to_be_unhealthy() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), probing=True)
    await pool.refresh()
    first, second = pool.replicas
    pool.probed(first, ready=True)
    pool.probed(second, ready=True)
    pool.probed(first, ready=None)
    pool.probed(first, ready=None)
    pool.probed(first, ready=True)  # a probe answered: the streak starts over
    pool.probed(first, ready=None)
    pool.probed(first, ready=None)
    assert pool.states()["unhealthy"] == 0
    pool.probed(first, ready=None)
    assert pool.states()["unhealthy"] == 1
    # an ejected replica that answers its probe is taken back (as Envoy does)
    for _ in range(pool.eject_after_failures):
        pool.failed(second)
    assert second.ejected_until > 0
    pool.probed(second, ready=True)
    assert second.available(time.monotonic())


async def test_a_replica_answering_traffic_is_not_made_unhealthy_by_slow_probes() -> None:
    pool = make_pool(("10.0.0.1", 80), ("10.0.0.2", 80), probing=True)
    await pool.refresh()
    busy, other = pool.replicas
    pool.probed(busy, ready=True)
    pool.probed(other, ready=True)
    pool.succeeded(busy)  # it answers requests, just not its probe in time
    for _ in range(pool.probe_failures + 2):
        pool.probed(busy, ready=None)
    assert pool.states()["unhealthy"] == 0
    assert busy.probe_failures == 0

    busy.answered_at = time.monotonic() - pool.busy_grace_seconds - 1  # silent since
    for _ in range(pool.probe_failures - 1):
        pool.probed(busy, ready=None)
    assert pool.states()["unhealthy"] == 0
    pool.probed(busy, ready=None)
    assert pool.states()["unhealthy"] == 1
    # saying "not ready" is heard at once, answering traffic or not
    pool.probed(busy, ready=True)
    pool.succeeded(busy)
    pool.probed(busy, ready=False)
    assert pool.states()["unhealthy"] == 1


async def test_an_application_error_never_ejects_a_replica(
    redis_url: str, minter: TokenMinter
) -> None:
    """A 500 answers a request (a bad one, say): no streak of them takes the
    only replica out, so no client can take a service offline with them."""
    async with running_upstream("one") as (service, base_url):
        settings = gateway_settings(
            redis_url, catalog_upstream=urls(base_url), eject_after_failures=2
        )
        async with running_gateway(settings, minter) as (_, client):
            service.failing = True
            statuses = [(await client.get("/catalog/flaky")).status_code for _ in range(10)]
            service.failing = False
            after = await client.get("/catalog/flaky")
    assert statuses == [500] * 10
    assert after.status_code == 200
    assert service.hits == 11


async def test_ejects_a_sick_replica_and_takes_it_back(redis_url: str, minter: TokenMinter) -> None:
    async with (
        running_upstream("one") as (sick, sick_url),
        running_upstream("two") as (_well, well_url),
    ):
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(sick_url, well_url),
            eject_after_failures=2,
            # long enough to outlast the assertions on a slow machine; then
            # ended by hand, as its time running out would
            eject_seconds=60,
        )
        async with running_gateway(settings, minter) as (app, client):
            sick.failing, sick.failing_status = True, 503
            answers = [await client.get("/catalog/flaky") for _ in range(6)]
            metrics = (await client.get("/metrics")).text
            nodes_after = {(await client.get("/catalog/flaky")).json()["node"] for _ in range(4)}
            sick.failing = False
            for replica in app.runtime.routes["catalog"].pool.replicas:
                replica.ejected_until = min(replica.ejected_until, time.monotonic())

            async def back() -> bool:
                node: str = (await client.get("/catalog/flaky")).json()["node"]
                return node == "one"

            await eventually(back)
    # two 503s from "one" in a row eject it; "two" takes everything after that
    assert [a.status_code for a in answers].count(503) == 2
    assert nodes_after == {"two"}
    assert 'gateway_upstream_replicas{route="catalog",state="ejected"} 1.0' in metrics


async def test_a_dependency_outage_the_service_reports_ejects_nothing(
    redis_url: str, minter: TokenMinter
) -> None:
    async with (
        running_upstream("one") as (first, first_url),
        running_upstream("two") as (_, second_url),
    ):
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(first_url, second_url),
            eject_after_failures=2,
            eject_seconds=30,
        )
        async with running_gateway(settings, minter) as (_, client):
            # what kit answers when a dependency is down: its own 503 problem
            first.failing, first.failing_status = True, 503
            first.failing_media_type = "application/problem+json"
            answers = [await client.get("/catalog/flaky") for _ in range(8)]
            metrics = (await client.get("/metrics")).text
    # "one" keeps its share: its answer is the service's, not a sick replica's
    assert [a.json()["node"] for a in answers].count("one") == 4
    assert 'gateway_upstream_replicas{route="catalog",state="ejected"} 0.0' in metrics


async def test_a_panic_keeps_serving_when_every_replica_fails_its_probe(
    redis_url: str, minter: TokenMinter
) -> None:
    async with (
        running_upstream("one") as (first, first_url),
        running_upstream("two") as (second, second_url),
    ):
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(first_url, second_url),
            health_check_interval_seconds=0.05,
        )
        async with running_gateway(settings, minter) as (app, client):
            pool = app.runtime.routes["catalog"].pool
            first.ready = second.ready = False

            async def all_unhealthy() -> bool:
                return not any(r.healthy for r in pool.replicas)

            await eventually(all_unhealthy)
            nodes = {(await client.get("/catalog/echo")).json()["node"] for _ in range(6)}
            metrics = (await client.get("/metrics")).text
    assert nodes == {"one", "two"}
    assert 'gateway_upstream_panic{route="catalog"} 1.0' in metrics


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
    # the dead port refuses: down, out of the count; one of two live is healthy
    assert nodes == {"one"}


class FakeDns:
    """Answers for one name, as Docker's DNS does for `tasks.<service>`: the
    addresses of the replicas that are up now (none: the name does not exist).
    Every other name goes to the real resolver."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.name = name
        self.addresses: list[str] = []
        self.lookups = 0
        loop = asyncio.get_running_loop()
        self.real = loop.getaddrinfo
        monkeypatch.setattr(loop, "getaddrinfo", self.getaddrinfo)

    async def getaddrinfo(
        self, host: object, port: object, *args: object, **kwargs: object
    ) -> object:
        if host != self.name:
            return await self.real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        self.lookups += 1
        if not self.addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in self.addresses
        ]


async def test_a_replica_new_in_dns_since_the_last_resolution_serves_the_first_request(
    gateway_with_a_late_replica: GatewayWithALateReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deploy converging: the gateway started before catalog was in DNS, and
    # its next resolution is a minute away.
    dns = FakeDns(monkeypatch, "catalog.test")
    async with (
        gateway_with_a_late_replica("catalog", host="catalog.test") as late,
        late.listen(Upstream("late")),
    ):
        assert late.app.runtime.routes["catalog"].pool.replicas == []
        dns.addresses = ["127.0.0.1"]
        response = await late.client.get("/catalog/echo")
    assert response.status_code == 200, response.text
    assert response.json()["node"] == "late"


async def test_a_replica_that_refused_the_last_probe_serves_once_it_listens(
    gateway_with_a_late_replica: GatewayWithALateReplica,
) -> None:
    async with gateway_with_a_late_replica("chat") as late:
        # nothing listened at the start-up probe: down for a minute
        assert late.app.runtime.routes["chat"].pool.states()["down"] == 1
        async with late.listen(Upstream("late")):
            response = await late.client.get("/chat/echo")
    assert response.status_code == 200, response.text
    assert response.json()["node"] == "late"


async def test_requests_refused_together_share_one_look(
    gateway_with_a_late_replica: GatewayWithALateReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = FakeDns(monkeypatch, "catalog.test")
    # the replica never comes: every request is refused
    async with gateway_with_a_late_replica("catalog", host="catalog.test") as late:
        at_start = dns.lookups
        started = time.monotonic()
        responses = await asyncio.gather(*(late.client.get("/catalog/echo") for _ in range(20)))
        elapsed = time.monotonic() - started
    assert {response.status_code for response in responses} == {503}
    assert {response.json()["detail"] for response in responses} == {
        "No catalog replica is available"
    }
    # one look a second at most, whatever the number of requests refused
    assert 1 <= dns.lookups - at_start <= 1 + int(elapsed)


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
