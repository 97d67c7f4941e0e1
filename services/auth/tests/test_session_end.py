"""Ending a user's sessions holds against what runs beside it: a refresh
under way, and Redis failing while the change is being written."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.passwords import Passwords
from kit.errors import ServiceUnavailable
from kit.security import revoke_user
from kit_testing import MailCatcher

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from .factories import Account, Tokens, login, register, registered_and_logged_in
from .test_attacks import refused
from .test_password_reset import NEW_PASSWORD, emailed_reset_tokens, forgot
from .test_router import assert_problem

Ender = Callable[[httpx.AsyncClient, Account, Tokens], Coroutine[Any, Any, httpx.Response]]


async def logout(client: httpx.AsyncClient, _account: Account, tokens: Tokens) -> httpx.Response:
    return await client.post("/auth/logout", headers=tokens.headers)


def password_reset(mail: MailCatcher) -> Ender:
    async def reset(client: httpx.AsyncClient, account: Account, _tokens: Tokens) -> httpx.Response:
        await forgot(client, account.email)
        (token,) = await emailed_reset_tokens(mail, account.email)
        return await client.post(
            "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
        )

    return reset


async def a_statement_waits_for_a_lock(
    sessionmaker: async_sessionmaker[AsyncSession], *, within: float = 10.0
) -> None:
    async with asyncio.timeout(within), sessionmaker() as session:
        while True:
            waiting = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
            if waiting:
                return
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("end", ["logout", "password reset"])
async def test_a_session_ended_during_a_refresh_ends_the_token_that_refresh_yields(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    mail: MailCatcher,
    monkeypatch: pytest.MonkeyPatch,
    end: str,
) -> None:
    """The refresh holds its token's row when the session is ended; the token
    it then adds must be revoked with the rest, though the revoking statement
    started before it was written."""
    account, tokens = await registered_and_logged_in(client)
    ender = logout if end == "logout" else password_reset(mail)
    holding, release = asyncio.Event(), asyncio.Event()
    not_before = service._not_before

    async def held_with_its_row_locked(redis: Redis, user_id: uuid.UUID) -> float | None:
        monkeypatch.setattr(service, "_not_before", not_before)  # this refresh only
        holding.set()
        await release.wait()
        return await not_before(redis, user_id)

    monkeypatch.setattr(service, "_not_before", held_with_its_row_locked)
    refresh = asyncio.create_task(
        client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    )
    await holding.wait()
    ended = asyncio.create_task(ender(client, account, tokens))
    await a_statement_waits_for_a_lock(sessionmaker)
    release.set()
    refreshed, ending = await refresh, await ended

    assert refreshed.status_code == 200, refreshed.text
    assert ending.status_code == 204, ending.text
    yielded = refreshed.json()
    again = await client.post("/auth/refresh", json={"refresh_token": yielded["refresh_token"]})
    assert_problem(again, 401)
    assert await refused(client, yielded["access_token"]) == "Token revoked"


async def test_redis_failing_before_a_deactivation_is_written_costs_a_retry_not_the_revocation(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    account, tokens = await registered_and_logged_in(client)
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)

    async def unreachable_once(redis: Redis, user_id: str, *, before: float, ttl: int) -> None:
        monkeypatch.setattr(service, "revoke_user", revoke_user)
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(service, "revoke_user", unreachable_once)
    path, change = f"/auth/users/{account.id}", {"is_active": False}
    failed = await client.patch(path, json=change, headers=admin.headers)
    assert assert_problem(failed, 503)["detail"] == "Token revocation list is unreachable; retry"
    # nothing was written: the account is active and its token works
    assert (await client.get("/auth/users/me", headers=tokens.headers)).status_code == 200

    retried = await client.patch(path, json=change, headers=admin.headers)
    assert retried.status_code == 200, retried.text
    assert retried.json()["is_active"] is False
    assert await refused(client, tokens.access) == "Token revoked"
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert_problem(refreshed, 401)


async def test_redis_failing_during_a_reset_leaves_the_reset_token_for_the_retry(
    client: httpx.AsyncClient, mail: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    account, tokens = await registered_and_logged_in(client)
    await forgot(client, account.email)
    (token,) = await emailed_reset_tokens(mail, account.email)

    async def unreachable_once(redis: Redis, user_id: str, *, before: float, ttl: int) -> None:
        monkeypatch.setattr(service, "revoke_user", revoke_user)
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(service, "revoke_user", unreachable_once)
    body = {"token": token, "password": NEW_PASSWORD}
    assert_problem(await client.post("/auth/password/reset", json=body), 503)
    # the old password still works: nothing was written
    await login(client, account.email, account.password)

    retried = await client.post("/auth/password/reset", json=body)
    assert retried.status_code == 204, retried.text
    assert await refused(client, tokens.access) == "Token revoked"
    await login(client, account.email, NEW_PASSWORD)


async def test_a_login_whose_password_check_overlaps_a_reset_gets_no_session(
    client: httpx.AsyncClient, mail: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone with the old password logs in while the owner resets it: the
    password matched when it was checked, but the reset committed before the
    login issued anything. The login is refused; nothing it could refresh
    outlives the reset."""
    account = await register(client)
    await forgot(client, account.email)
    (token,) = await emailed_reset_tokens(mail, account.email)
    checking, release = asyncio.Event(), asyncio.Event()
    verify = Passwords.verify

    async def checked_slowly(self: Passwords, password_hash: str, password: str) -> bool:
        matched = await verify(self, password_hash, password)
        if password == account.password and not release.is_set():
            checking.set()
            await release.wait()
        return matched

    monkeypatch.setattr(Passwords, "verify", checked_slowly)
    old_password = {"username": account.email, "password": account.password}
    attempt = asyncio.create_task(client.post("/auth/token", data=old_password))
    await asyncio.wait_for(checking.wait(), 10)
    reset = await client.post(
        "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
    )
    release.set()
    refused_login = await attempt

    assert reset.status_code == 204
    assert refused_login.status_code == 400
    assert refused_login.json()["error"] == "invalid_grant"
    assert (await login(client, account.email, NEW_PASSWORD)).access


async def test_a_logout_that_failed_part_way_is_done_by_its_retry(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refused one of the session's access tokens: 503, and the retry,
    with the same access token, ends the session."""
    _, first = await registered_and_logged_in(client)
    refreshed = await client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": first.refresh}
    )
    tokens = Tokens(refreshed.json()["access_token"], refreshed.json()["refresh_token"])
    calls = 0
    blocklist = service.blocklist

    async def second_refused(**arguments: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ServiceUnavailable("Token revocation list is unreachable; retry")
        await blocklist(**arguments)

    monkeypatch.setattr(service, "blocklist", second_refused)
    failed = await client.post("/auth/logout", headers=tokens.headers)
    retried = await client.post("/auth/logout", headers=tokens.headers)

    assert failed.status_code == 503
    assert retried.status_code == 204
    assert await refused(client, tokens.access)
    again = await client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": tokens.refresh}
    )
    assert again.status_code == 400


async def test_two_reset_tokens_of_one_account_used_at_once_reset_it_once(
    client: httpx.AsyncClient, mail: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset email asked for twice, both links followed at once: one
    resets, the other finds its token spent (each spends the other's). Never
    a deadlock, never a 5xx."""
    account = await register(client)
    for _ in range(2):
        await forgot(client, account.email)
    first, second = await emailed_reset_tokens(mail, account.email, count=2)
    hashing = 0
    both_hashing, hash_password = asyncio.Event(), Passwords.hash

    async def hashed_together(self: Passwords, password: str) -> str:
        nonlocal hashing
        hashing += 1
        if hashing == 2:
            both_hashing.set()
        await asyncio.wait_for(both_hashing.wait(), 10)
        return await hash_password(self, password)

    monkeypatch.setattr(Passwords, "hash", hashed_together)
    answers = await asyncio.gather(
        *(
            client.post("/auth/password/reset", json={"token": token, "password": NEW_PASSWORD})
            for token in (first, second)
        )
    )

    assert sorted(answer.status_code for answer in answers) == [204, 400]
    assert (await login(client, account.email, NEW_PASSWORD)).access


async def test_a_frozen_redis_costs_a_logout_a_503_not_a_hang(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    """Redis takes no write (paused): the logout answers 503 within the
    revocation's time limit, the session already ended in the database."""
    _, tokens = await registered_and_logged_in(client)
    redis = Redis.from_url(redis_url)
    try:
        await redis.client_pause(8000, all=False)  # writes wait; reads go on
        started = asyncio.get_running_loop().time()
        frozen = await client.post("/auth/logout", headers=tokens.headers)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await redis.client_unpause()
        await redis.aclose()
    refresh = await client.post(
        "/auth/token", data={"grant_type": "refresh_token", "refresh_token": tokens.refresh}
    )

    assert frozen.status_code == 503
    assert waited < service.REVOCATION_WRITE_TIMEOUT_SECONDS + 3
    assert refresh.status_code == 400
