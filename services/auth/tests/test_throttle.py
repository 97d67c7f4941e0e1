"""Login throttling under attack: concurrent guesses, a stranger guessing
someone else's password, guesses spread over many addresses, a reset, and
Redis going away. Real PostgreSQL, real Redis, real argon2."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from auth.config import Settings
from auth.errors import InvalidCredentials
from auth.throttle import (
    LoginThrottle,
    account_failures_key,
    client_failures_key,
    pair_failures_key,
)
from kit.errors import RateLimited
from kit_testing import MailCatcher, free_port

from .factories import Account, register, unique_email
from .test_password_reset import NEW_PASSWORD, emailed_reset_tokens, forgot

_networks = itertools.count(1)


def addresses() -> Iterator[str]:
    """Client addresses no other test uses (throttling counts are per address)."""
    network = next(_networks)
    return (f"198.51.{network}.{host}" for host in itertools.count(1))


@contextlib.asynccontextmanager
async def from_address(app: FastAPI, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app.state.asgi, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://auth") as http:
        yield http


async def log_in(http: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await http.post("/auth/token", data={"username": email, "password": password})


async def once_admitted(
    http: httpx.AsyncClient, email: str, password: str, within: float = 5.0
) -> httpx.Response:
    """Logs in again whenever `Retry-After` says, until the throttle admits it."""
    deadline = time.monotonic() + within
    while True:
        answer = await log_in(http, email, password)
        if answer.status_code != 429:
            return answer
        assert time.monotonic() < deadline, "the delay never ended"
        await asyncio.sleep(int(answer.headers["retry-after"]) / 4)


@pytest.fixture
async def account(app: FastAPI) -> Account:
    async with from_address(app, "192.0.2.250") as http:
        return await register(http)


async def test_concurrent_guesses_get_at_most_the_limit_of_password_checks(
    app: FastAPI, account: Account
) -> None:
    (address,) = itertools.islice(addresses(), 1)
    async with from_address(app, address) as http:
        answers = await asyncio.gather(
            *(log_in(http, account.email, f"guess number {n}") for n in range(40))
        )
    statuses = Counter(answer.status_code for answer in answers)
    # login_failures_per_account_and_client is 3 in the test settings
    assert statuses == {400: 3, 429: 37}
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["detail"] == "Too many failed logins; try again later"
    assert 0 < int(refused.headers["retry-after"]) <= 900


async def test_a_stranger_cannot_lock_the_owner_out(app: FastAPI, account: Account) -> None:
    stranger, owner = itertools.islice(addresses(), 2)
    async with from_address(app, stranger) as http:
        guesses = [(await log_in(http, account.email, "guess 1234")).status_code for _ in range(6)]
    async with from_address(app, owner) as http:
        mine = await log_in(http, account.email, account.password)
    assert guesses == [400, 400, 400, 429, 429, 429]
    assert mine.status_code == 200


async def test_hosts_of_one_ipv6_network_are_one_address(app: FastAPI, account: Account) -> None:
    # a host may take any address of its /64: each would otherwise be a fresh count
    network = next(_networks)
    guesses = []
    for host in range(1, 5):
        async with from_address(app, f"2001:db8:{network:x}::{host:x}") as http:
            guesses.append((await log_in(http, account.email, "guess 1234")).status_code)
    async with from_address(app, f"2001:db8:{network + 1:x}::1") as http:
        elsewhere = await log_in(http, account.email, account.password)
    assert guesses == [400, 400, 400, 429]
    assert elsewhere.status_code == 200


async def test_guesses_spread_over_many_addresses_are_slowed_not_locked(
    app: FastAPI, account: Account
) -> None:
    spread = addresses()
    # login_failures_per_account is 10: ten addresses, one guess each
    for _ in range(10):
        async with from_address(app, next(spread)) as http:
            assert (await log_in(http, account.email, "guess 1234")).status_code == 400
    async with from_address(app, next(spread)) as http:
        over = await log_in(http, account.email, "guess 1234")  # admitted: 1 s to the next
        held = await log_in(http, account.email, account.password)
    assert over.status_code == 400
    assert held.status_code == 429
    assert held.headers["retry-after"] == "1"

    async with from_address(app, next(spread)) as owner:
        answer = await once_admitted(owner, account.email, account.password)
        again = await log_in(owner, account.email, "guess 1234")
    assert answer.status_code == 200  # never a hard lock: the owner gets in
    # the next attempt waits longer: the delay doubles (capped at 2 s in the tests)
    assert again.status_code == 429
    assert again.headers["retry-after"] == "2"


async def test_a_password_reset_clears_the_account_counts(
    app: FastAPI, account: Account, mail: MailCatcher
) -> None:
    (address,) = itertools.islice(addresses(), 1)
    async with from_address(app, address) as http:
        for _ in range(3):
            await log_in(http, account.email, "forgot it again")
        locked = await log_in(http, account.email, account.password)
        await forgot(http, account.email)
        (token,) = await emailed_reset_tokens(mail, account.email)
        reset = await http.post(
            "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
        )
        after = await log_in(http, account.email, NEW_PASSWORD)
    assert locked.status_code == 429
    assert reset.status_code == 204
    assert after.status_code == 200


async def counts(redis: Redis, email: str, client: str) -> list[int]:
    keys = [pair_failures_key(email, client), client_failures_key(client)]
    values = await redis.mget([*keys, account_failures_key(email)])
    return [int(value or 0) for value in values]


async def test_only_a_checked_password_counts(settings: Settings, redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    throttle = LoginThrottle(redis=redis, settings=settings)
    email, client = unique_email(), "203.0.113.9"
    try:
        with pytest.raises(InvalidCredentials):
            async with throttle.attempt(email=email, client=client):
                raise InvalidCredentials
        assert await counts(redis, email, client) == [1, 1, 1]
        with pytest.raises(ConnectionResetError):  # the database failed: never checked
            async with throttle.attempt(email=email, client=client):
                raise ConnectionResetError
        assert await counts(redis, email, client) == [1, 1, 1]
        async with throttle.attempt(email=email, client=client):
            pass  # the right password: its own attempt goes, and so does the pair's count
        assert await counts(redis, email, client) == [0, 1, 1]
    finally:
        await redis.aclose()


async def test_without_redis_each_replica_counts_against_half_the_limits(
    settings: Settings,
) -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    throttle = LoginThrottle(redis=redis, settings=settings)
    email = unique_email()
    outcomes = []
    try:
        for _ in range(3):
            try:
                async with throttle.attempt(email=email, client="203.0.113.10"):
                    raise InvalidCredentials
            except InvalidCredentials:
                outcomes.append("checked")
            except RateLimited:
                outcomes.append("refused")
        async with throttle.attempt(email=email, client="203.0.113.11"):
            outcomes.append("another address")
    finally:
        await redis.aclose()
    # ceil(3 * 0.5) = 2 per (account, address) while Redis is away
    assert outcomes == ["checked", "checked", "refused", "another address"]
