"""Edge auth and rate limits: refusals happen before any upstream sees a request."""

from __future__ import annotations

import time
import uuid

import httpx
from redis.asyncio import Redis

from gateway.main import Gateway
from kit.security import revoked_token_key, revoked_user_key
from kit.testing import TokenMinter, free_port

from .conftest import gateway_settings, header_values, running_gateway, urls
from .upstreams import Upstream

GatewayClient = tuple[Gateway, httpx.AsyncClient]
# day-long windows: a test never straddles a window boundary (except at midnight UTC)
DAY = 86_400


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
        await redis.set(revoked_token_key(jti), "1", ex=60)
        await redis.set(revoked_user_key(user_id), "1800000000", ex=60)
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
    settings = gateway_settings(
        clean_redis_url,
        catalog_upstream=urls(upstream[1]),
        rate_limit_enabled=True,
        rate_limit_anonymous=3,
        rate_limit_user=5,
        rate_limit_window_seconds=DAY,
    )
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


async def test_refused_tokens_count_against_the_address(
    upstream: tuple[Upstream, str], clean_redis_url: str, minter: TokenMinter
) -> None:
    settings = gateway_settings(
        clean_redis_url,
        catalog_upstream=urls(upstream[1]),
        rate_limit_enabled=True,
        rate_limit_anonymous=2,
        rate_limit_window_seconds=DAY,
    )
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
    settings = gateway_settings(
        clean_redis_url,
        catalog_upstream=urls(upstream[1]),
        rate_limit_enabled=True,
        rate_limit_user=2,
        rate_limit_window_seconds=DAY,
    )
    alice, bob = minter.token(user_id="alice"), minter.token(user_id="bob")
    async with running_gateway(settings, minter) as (_, client):
        statuses = [
            (
                await client.get("/catalog/echo", headers={"Authorization": f"Bearer {token}"})
            ).status_code
            for token in (alice, alice, alice, bob)
        ]
    assert statuses == [200, 200, 429, 200]


async def test_fails_open_or_closed_when_redis_is_down(
    upstream: tuple[Upstream, str], minter: TokenMinter
) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    for fail_open, expected in ((True, 200), (False, 503)):
        settings = gateway_settings(
            unreachable,
            catalog_upstream=urls(upstream[1]),
            rate_limit_enabled=True,
            rate_limit_fail_open=fail_open,
        )
        async with running_gateway(settings, minter) as (_, client):
            responses = [await client.get("/catalog/echo") for _ in range(2)]
            metrics = (await client.get("/metrics")).text
        assert [r.status_code for r in responses] == [expected, expected]
        assert "ratelimit-limit" not in responses[0].headers
        outcome = "allowed" if fail_open else "refused"
        assert f'gateway_rate_limit_unavailable_total{{outcome="{outcome}"}} 2.0' in metrics
    assert responses[0].json()["detail"] == "Rate limiting is unavailable; retry shortly"
    assert upstream[0].hits == 2


async def test_revocation_applies_to_a_token_already_verified(
    gateway: GatewayClient, upstream: tuple[Upstream, str], minter: TokenMinter, redis_url: str
) -> None:
    _, client = gateway
    jti = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {minter.token(jti=jti)}"}
    first = await client.get("/catalog/echo", headers=headers)
    redis = Redis.from_url(redis_url)
    try:
        await redis.set(revoked_token_key(jti), "1", ex=60)
    finally:
        await redis.aclose()
    second = await client.get("/catalog/echo", headers=headers)
    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json()["detail"] == "Token revoked"
    assert upstream[0].hits == 1
