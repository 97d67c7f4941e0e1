"""Edge auth and rate limits: refusals happen before any upstream sees a request."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.config import Settings
from gateway.main import Gateway, create_app
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import KNOWN_MAX_IDENTITIES, LocalWindows, RateLimiter
from kit.context import request_id_var
from kit.errors import RateLimited
from kit.security import revoke_token, revoke_user
from kit_testing import JwksServer, Service, TokenMinter, free_port, serve, wait_for_redis

from .conftest import gateway_settings, header_values, in_process_gateway, running_gateway, urls
from .upstreams import Upstream

GatewayClient = tuple[Gateway, httpx.AsyncClient]
# day-long windows: a test never straddles a window boundary (except at midnight UTC)
DAY = 86_400


def limited(redis_url: str, upstream_url: str, **overrides: Any) -> Settings:
    """The gateway in front of `upstream_url` with rate limits on, in a window
    of a day (no test sees it end)."""
    return gateway_settings(
        redis_url,
        catalog_upstream=urls(upstream_url),
        rate_limit_enabled=True,
        rate_limit_window_seconds=DAY,
        **overrides,
    )


async def test_passes_a_valid_token_to_the_service(
    gateway: GatewayClient, minter: TokenMinter
) -> None:
    _, client = gateway
    token = minter.token()
    response = await client.get("/catalog/echo", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert header_values(response.json(), "authorization") == [f"Bearer {token}"]


async def test_refuses_invalid_and_expired_tokens_before_the_service(
    gateway: GatewayClient, upstream: tuple[Upstream, str], minter: TokenMinter
) -> None:
    _, client = gateway
    other_issuer = TokenMinter()  # signed by a key the gateway does not know
    cases = {
        "garbage": "Malformed token",
        minter.token(lifetime=-30): "Token expired",
        minter.token(aud="someone-else"): "Token claims are invalid",
        other_issuer.token(): "Token signed by an unknown key",
    }
    for token, detail in cases.items():
        response = await client.get("/catalog/echo", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"] == detail
        assert response.json()["instance"] == response.headers["x-request-id"]
    assert upstream[0].hits == 0


async def test_refuses_revoked_tokens_and_users(
    gateway: GatewayClient, upstream: tuple[Upstream, str], minter: TokenMinter, redis_url: str
) -> None:
    _, client = gateway
    jti, user_id = uuid.uuid4().hex, str(uuid.uuid4())
    revoked = minter.token(jti=jti)
    # issued before the user's revocation time below (and within the maximum lifetime)
    older = minter.token(user_id=user_id, iat=int(time.time()) - 60)
    redis = Redis.from_url(redis_url)
    try:
        # as auth writes them: the writer's own process applies them at once
        await revoke_token(redis, jti, ttl=60)
        await revoke_user(redis, user_id, before=1_800_000_000, ttl=60)
        for token in (revoked, older):
            response = await client.get(
                "/catalog/echo", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401
            assert response.json()["detail"] == "Token revoked"
    finally:
        await redis.aclose()
    assert upstream[0].hits == 0


async def test_limits_anonymous_clients_by_address(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    settings = limited(clean_redis_url, upstream[1], rate_limit_anonymous=3, rate_limit_user=5)
    async with running_gateway(settings, minter) as (_, client):
        allowed = [await client.get("/catalog/echo") for _ in range(3)]
        refused = await client.get("/catalog/echo")
        # a signed-in user counts against a quota of their own
        token = minter.token()
        signed_in = await client.get("/catalog/echo", headers={"Authorization": f"Bearer {token}"})
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
    assert {r.headers["ratelimit-limit"] for r in allowed} == {"3"}
    assert 1 <= int(allowed[0].headers["ratelimit-reset"]) <= DAY
    assert refused.status_code == 429
    assert refused.json()["title"] == "Too many requests"
    assert refused.json()["retry_after"] == int(refused.headers["retry-after"])
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= DAY
    assert signed_in.status_code == 200
    assert signed_in.headers["ratelimit-limit"] == "5"
    assert signed_in.headers["ratelimit-remaining"] == "4"
    assert upstream[0].hits == 4
    assert 'gateway_rate_limited_total{client="anonymous"} 1.0' in metrics


async def test_a_gateway_that_stops_sends_the_counts_it_kept(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    # far from the limit, and no sync due before the gateway stops
    settings = limited(
        clean_redis_url, upstream[1], rate_limit_anonymous=1000, rate_limit_sync_seconds=60
    )
    async with Redis.from_url(clean_redis_url) as redis:
        async with running_gateway(settings, minter) as (_, client):
            responses = [await client.get("/catalog/echo") for _ in range(3)]
            assert [r.headers["ratelimit-remaining"] for r in responses] == ["999", "998", "997"]
            assert await counts_in_redis(redis, "ip:127.0.0.1") is None
        assert await counts_in_redis(redis, "ip:127.0.0.1") == 3


@pytest.mark.parametrize(
    ("trusted", "expected"), [(True, [200, 429, 200]), (False, [200, 429, 429])]
)
async def test_behind_a_trusted_proxy_each_client_it_reports_has_its_own_limit(
    upstream: tuple[Upstream, str],
    clean_redis_url: str,
    minter: TokenMinter,
    trusted: bool,
    expected: list[int],
) -> None:
    settings = limited(
        clean_redis_url,
        upstream[1],
        rate_limit_anonymous=1,
        trust_forwarded_headers=trusted,
        log_level="INFO",
    )
    # the first entry is the client's own word; the last is the proxy's
    clients = ("203.0.113.1", "203.0.113.1", "203.0.113.2")
    logged: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: logged.append(record.fields["client"])  # type: ignore[method-assign,attr-defined]
    # in process: no server in front that would read X-Forwarded-For itself
    async with in_process_gateway(settings, minter) as (_, client):
        logging.getLogger("access").addHandler(collect)
        try:
            responses = [
                await client.get(
                    "/catalog/echo", headers={"X-Forwarded-For": f"198.51.100.7, {address}"}
                )
                for address in clients
            ]
        finally:
            logging.getLogger("access").removeHandler(collect)
    assert [response.status_code for response in responses] == expected
    assert logged == (list(clients) if trusted else ["127.0.0.1"] * 3)
    # the client's own entries never go on: the services take the first for their client
    assert header_values(responses[0].json(), "x-forwarded-for") == (
        ["203.0.113.1, 127.0.0.1"] if trusted else ["127.0.0.1"]
    )


async def test_an_ipv6_client_is_limited_by_its_network(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    # a host may take any address of its /64: one address a bucket would be
    # a fresh bucket for every request
    settings = limited(
        clean_redis_url,
        upstream[1],
        rate_limit_anonymous=1,
        trust_forwarded_headers=True,
    )
    clients = ("2001:db8:1:2::1", "2001:db8:1:2:a:b:c:d", "2001:db8:1:3::1")
    async with in_process_gateway(settings, minter) as (_, client):
        statuses = [
            (await client.get("/catalog/echo", headers={"X-Forwarded-For": address})).status_code
            for address in clients
        ]
    assert statuses == [200, 429, 200]


async def test_refused_tokens_count_against_the_address(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    settings = limited(clean_redis_url, upstream[1], rate_limit_anonymous=2)
    forged = {"Authorization": f"Bearer {TokenMinter().token()}"}
    async with running_gateway(settings, minter) as (_, client):
        statuses = [
            (await client.get("/catalog/echo", headers=forged)).status_code for _ in range(3)
        ]
        anonymous = await client.get("/catalog/echo")
    assert statuses == [401, 401, 429]
    assert anonymous.status_code == 429
    assert upstream[0].hits == 0


async def test_limits_each_user_on_their_own(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    settings = limited(clean_redis_url, upstream[1], rate_limit_user=2)
    alice, bob = minter.token(user_id="alice"), minter.token(user_id="bob")
    async with running_gateway(settings, minter) as (_, client):
        statuses = [
            (
                await client.get("/catalog/echo", headers={"Authorization": f"Bearer {token}"})
            ).status_code
            for token in (alice, alice, alice, bob)
        ]
    assert statuses == [200, 200, 429, 200]


async def test_counts_per_process_while_redis_is_down(
    upstream: tuple[Upstream, str], minter: TokenMinter
) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    settings = limited(unreachable, upstream[1], rate_limit_anonymous=2)
    async with running_gateway(settings, minter) as (_, client):
        responses = [await client.get("/catalog/echo") for _ in range(3)]
        with_token = await client.get(
            "/catalog/echo", headers={"Authorization": f"Bearer {minter.token()}"}
        )
        metrics = (await client.get("/metrics")).text
        readyz = await client.get("/readyz")
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].headers["ratelimit-limit"] == "2"
    assert responses[1].headers["ratelimit-remaining"] == "0"
    assert int(responses[2].headers["retry-after"]) >= 1
    assert "gateway_rate_limit_local_total 3.0" in metrics
    assert readyz.status_code == 200
    assert readyz.json()["optional"]["rate_limits"].startswith("Redis unreachable for")
    # no revocation list to check against, and no mirror synced before: retry later
    assert with_token.status_code == 503
    assert with_token.json()["detail"] == "Token revocation list is unreachable; retry"
    assert int(with_token.headers["retry-after"]) >= 1
    assert upstream[0].hits == 2


async def test_a_redis_connection_closed_under_the_limiter_costs_no_count(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    # Redis closed the gateway's pooled connection (a restart, its idle
    # timeout): the next count goes on a fresh one, not to local counting
    settings = limited(clean_redis_url, upstream[1], rate_limit_anonymous=5)
    async with running_gateway(settings, minter) as (app, client):
        first = await client.get("/catalog/echo")
        redis = app.runtime.redis
        killed = await redis.client_id()  # the connection the next count takes
        async with Redis.from_url(clean_redis_url) as killer:
            assert await killer.client_kill_filter(_id=str(killed)) == 1
        second = await client.get("/catalog/echo")
        assert app.runtime.limiter is not None
        assert not app.runtime.limiter.counting_locally
    assert [first.headers["ratelimit-remaining"], second.headers["ratelimit-remaining"]] == [
        "4",
        "3",
    ]


def limiter_on(
    redis: Redis,
    *,
    limit: int,
    sync_seconds: float,
    registry: CollectorRegistry | None = None,
    max_identities: int = KNOWN_MAX_IDENTITIES,
) -> RateLimiter:
    """A limiter of `limit` requests a day for anonymous clients and users alike."""
    return RateLimiter(
        redis,
        anonymous_limit=limit,
        user_limit=limit,
        window_seconds=DAY,
        metrics=GatewayMetrics(registry or CollectorRegistry(), list),
        sync_seconds=sync_seconds,
        max_identities=max_identities,
    )


async def hit_until_counted_in_redis(
    limiter: RateLimiter, redis_url: str, hit: Callable[[], Awaitable[object]]
) -> None:
    """Once Redis answers again, makes requests until the limiter counts there."""
    await wait_for_redis(redis_url)
    deadline = time.monotonic() + 15
    while limiter.counting_locally:  # Redis is tried again 1, 2, 4... s after failing
        assert time.monotonic() < deadline, "the limiter never went back to Redis"
        await hit()
        await asyncio.sleep(0.05)


async def test_limits_move_back_to_redis_when_it_returns(
    redis_service: Service, clean_redis_url: str
) -> None:
    redis = Redis.from_url(clean_redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    # every request counted in Redis as it comes
    limiter = limiter_on(redis, limit=100, sync_seconds=0)
    try:
        await limiter.hit(user_id=None, client_address="10.0.0.1")
        assert limiter.describe() == "ok"
        await asyncio.to_thread(redis_service.stop)
        try:
            quota = await limiter.hit(user_id=None, client_address="10.0.0.1")
            assert limiter.describe().startswith("Redis unreachable")
            assert quota.remaining == 99  # a count of this process's own, from one
        finally:
            await asyncio.to_thread(redis_service.start)
        await hit_until_counted_in_redis(
            limiter, clean_redis_url, lambda: limiter.hit(user_id=None, client_address="10.0.0.1")
        )
        # the hit that found Redis again was counted there (a restart emptied it)
        assert [key async for key in redis.scan_iter("gateway:ratelimit:ip:10.0.0.1:*")]
    finally:
        await redis.aclose()


async def counts_in_redis(redis: Redis, identity: str) -> int | None:
    keys = [key async for key in redis.scan_iter(f"gateway:ratelimit:{identity}:*")]
    assert len(keys) <= 1
    if not keys:
        return None
    count = await redis.get(keys[0])
    assert count is not None
    return int(count)


async def test_counts_far_from_the_limit_reach_redis_together_within_the_sync_interval(
    clean_redis_url: str,
) -> None:
    async with Redis.from_url(clean_redis_url) as redis:
        limiter = limiter_on(redis, limit=1000, sync_seconds=0.05)
        other = limiter_on(redis, limit=1000, sync_seconds=0.05)  # another gateway process
        try:
            remaining = [
                (await limiter.hit(user_id=None, client_address="10.0.0.1")).remaining
                for _ in range(10)
            ]
            for _ in range(5):
                await limiter.hit(user_id="alice", client_address="10.0.0.1")
            for _ in range(7):
                await other.hit(user_id=None, client_address="10.0.0.1")
            # admitted at once, counted here: nothing has gone to Redis yet
            assert remaining == list(range(999, 989, -1))
            assert await counts_in_redis(redis, "ip:10.0.0.1") is None
            deadline = time.monotonic() + 10
            while await counts_in_redis(redis, "ip:10.0.0.1") != 17:
                assert time.monotonic() < deadline, "the kept counts never reached Redis"
                await asyncio.sleep(0.01)
            assert await counts_in_redis(redis, "user:alice") == 5
            # a sync brings back the count of every process: the later of the two knows 17
            await asyncio.gather(*limiter._syncs, *other._syncs)
            quotas = [
                await process.hit(user_id=None, client_address="10.0.0.1")
                for process in (limiter, other)
            ]
            assert 1000 - 18 in {quota.remaining for quota in quotas}
            key = await anext(redis.scan_iter("gateway:ratelimit:ip:*"))
            assert 0 < await redis.ttl(key) <= DAY + 1
        finally:
            await limiter.close()
            await other.close()
        assert await counts_in_redis(redis, "ip:10.0.0.1") == 19  # the last two, sent at close


async def test_a_client_dropped_from_the_known_ones_still_has_its_counts_sent(
    clean_redis_url: str,
) -> None:
    async with Redis.from_url(clean_redis_url) as redis:
        # no sync but the one below
        limiter = limiter_on(redis, limit=1000, sync_seconds=60, max_identities=2)
        for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"):
            await limiter.hit(user_id=None, client_address=address)
        await limiter.sync()
        counts = [await counts_in_redis(redis, f"ip:10.0.0.{n}") for n in (1, 2, 3)]
        assert counts == [2, 1, 1]
        # 10.0.0.1 was dropped: what this process knows of it starts afresh
        assert (await limiter.hit(user_id=None, client_address="10.0.0.1")).remaining == 999
        await limiter.close()
        assert await counts_in_redis(redis, "ip:10.0.0.1") == 3


async def test_a_sync_runs_outside_the_request_that_started_its_interval(
    clean_redis_url: str,
) -> None:
    # the sync carries many requests' counts: it must not log or trace as the
    # first of them (kit.tracing traces no Redis call outside a request)
    async with Redis.from_url(clean_redis_url) as redis:
        limiter = limiter_on(redis, limit=1000, sync_seconds=0.01)
        seen: list[str | None] = []
        synced = asyncio.Event()
        send = limiter.sync

        async def sync() -> None:
            seen.append(request_id_var.get())
            await send()
            synced.set()

        limiter.sync = sync  # type: ignore[method-assign]

        async def request() -> None:
            request_id_var.set("first-request")
            await limiter.hit(user_id=None, client_address="10.0.0.5")

        await asyncio.create_task(request())
        await asyncio.wait_for(synced.wait(), timeout=10)
        assert seen == [None]
        await limiter.close()


async def test_near_its_limit_a_client_is_counted_in_redis_before_it_is_admitted(
    clean_redis_url: str,
) -> None:
    # a limit of 100: a process keeps at most 5 unsent, and none past 50
    async with Redis.from_url(clean_redis_url) as redis:
        limiter = limiter_on(redis, limit=100, sync_seconds=60)  # no sync meanwhile

        async def hit() -> int:
            return (await limiter.hit(user_id=None, client_address="10.0.0.1")).remaining

        try:
            assert [await hit() for _ in range(5)] == [99, 98, 97, 96, 95]
            assert await counts_in_redis(redis, "ip:10.0.0.1") is None
            assert await hit() == 94  # a sixth unsent is past the share: all six sent
            assert await counts_in_redis(redis, "ip:10.0.0.1") == 6
            # other processes count 54 more; this one does not know yet
            key = await anext(redis.scan_iter("gateway:ratelimit:ip:*"))
            await redis.incrby(key, 54)
            assert [await hit() for _ in range(5)] == [93, 92, 91, 90, 89]
            assert await hit() == 100 - 66  # sent with the five kept, and learns of the 54
            # past half the limit, each request is counted in Redis before it passes
            assert await hit() == 100 - 67
            assert await counts_in_redis(redis, "ip:10.0.0.1") == 67
            await redis.incrby(key, 100 - 67)
            with pytest.raises(RateLimited):
                await hit()
            assert await counts_in_redis(redis, "ip:10.0.0.1") == 101
        finally:
            await limiter.close()


async def test_counts_kept_while_redis_is_down_are_sent_once_it_answers(
    redis_service: Service, clean_redis_url: str
) -> None:
    redis = Redis.from_url(clean_redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    registry = CollectorRegistry()
    limiter = limiter_on(redis, limit=100, sync_seconds=0.05, registry=registry)
    hits = 0

    async def hit() -> int:
        nonlocal hits
        hits += 1
        return (await limiter.hit(user_id=None, client_address="10.0.0.2")).remaining

    try:
        await asyncio.to_thread(redis_service.stop)
        try:
            assert await hit() == 99  # kept, for a sync that finds Redis gone
            deadline = time.monotonic() + 10
            while limiter.describe() == "ok":
                assert time.monotonic() < deadline, "the failed sync went unnoticed"
                await asyncio.sleep(0.01)
            assert await hit() == 99  # counted in this process, from one
        finally:
            await asyncio.to_thread(redis_service.start)
        await hit_until_counted_in_redis(limiter, clean_redis_url, hit)
        await limiter.close()
        # every request not counted per process reached Redis (emptied by its
        # restart): the one kept through the outage too
        counted_locally = registry.get_sample_value("gateway_rate_limit_local_total")
        assert counted_locally is not None
        assert await counts_in_redis(redis, "ip:10.0.0.2") == hits - counted_locally
    finally:
        await limiter.close()
        await redis.aclose()


async def test_counts_of_a_sync_that_timed_out_are_not_sent_twice(
    redis_service: Service, clean_redis_url: str
) -> None:
    # Redis frozen: it takes the sync's counts and answers too late. They may
    # have been counted (here they are, once Redis runs again), so the
    # limiter does not send them again.
    redis = Redis.from_url(clean_redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    limiter = limiter_on(redis, limit=100, sync_seconds=60)  # no sync but the ones below
    try:
        for _ in range(3):
            await limiter.hit(user_id=None, client_address="10.0.0.3")
        await redis.ping()  # the sync's connection, open before Redis freezes
        async with redis_service.frozen():
            await limiter.sync()
            assert limiter.counting_locally
        await hit_until_counted_in_redis(
            limiter, clean_redis_url, lambda: limiter.hit(user_id=None, client_address="10.0.0.4")
        )
        await limiter.close()
        assert await counts_in_redis(redis, "ip:10.0.0.3") == 3
    finally:
        await limiter.close()
        await redis.aclose()


def test_local_counters_are_bounded_and_start_afresh_each_window() -> None:
    local = LocalWindows(max_identities=2)
    assert [local.hit("a", 1), local.hit("a", 1), local.hit("b", 1)] == [1, 2, 1]
    assert local.hit("c", 1) == 1  # "a", the least recently seen, makes room
    assert len(local) == 2
    assert local.hit("a", 1) == 1
    assert local.hit("c", 2) == 1  # a new window


async def test_a_token_whose_key_cannot_be_fetched_is_a_503_until_auth_answers(
    upstream: tuple[Upstream, str], redis_url: str
) -> None:
    minter = TokenMinter()
    jwks = JwksServer(minter.jwks)
    jwks.failing = True  # auth answers 503: it cannot say which keys exist
    headers = {"Authorization": f"Bearer {minter.token()}"}
    async with serve(jwks, lifespan="off") as auth_base:
        settings = gateway_settings(
            redis_url,
            catalog_upstream=urls(upstream[1]),
            jwks_url=f"{auth_base}/auth/.well-known/jwks.json/{uuid.uuid4().hex}",
        )
        async with (
            serve(create_app(settings)) as base,
            httpx.AsyncClient(base_url=base) as client,
        ):
            refused = await client.get("/catalog/echo", headers=headers)
            degraded = await client.get("/readyz")
            anonymous = await client.get("/catalog/echo")
            jwks.failing = False
            deadline = time.monotonic() + 15
            while (await client.get("/readyz")).json()["status"] != "ok":
                assert time.monotonic() < deadline, "the key set was never fetched"
                await asyncio.sleep(0.05)  # the key source retries with backoff
            accepted = await client.get("/catalog/echo", headers=headers)
    assert refused.status_code == 503
    assert refused.json()["detail"].startswith("The token's signing key cannot be fetched")
    assert int(refused.headers["retry-after"]) >= 1
    assert degraded.status_code == 200
    assert degraded.json()["optional"]["keys"].startswith("auth unreachable for")
    assert anonymous.status_code == 200
    assert accepted.status_code == 200


async def test_revocation_applies_to_a_token_already_verified(
    gateway: GatewayClient, upstream: tuple[Upstream, str], minter: TokenMinter, redis_url: str
) -> None:
    _, client = gateway
    jti = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {minter.token(jti=jti)}"}
    first = await client.get("/catalog/echo", headers=headers)
    redis = Redis.from_url(redis_url)
    try:
        await revoke_token(redis, jti, ttl=60)
    finally:
        await redis.aclose()
    second = await client.get("/catalog/echo", headers=headers)
    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json()["detail"] == "Token revoked"
    assert upstream[0].hits == 1
