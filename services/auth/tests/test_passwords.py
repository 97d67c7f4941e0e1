from __future__ import annotations

import asyncio
import threading
import time
from typing import cast

import httpx
from fastapi import FastAPI, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.config import Settings
from auth.deps import SessionDep, get_passwords
from auth.errors import InvalidCredentials
from auth.models import User
from auth.passwords import Passwords
from kit_testing import MailCatcher

from .factories import login, register, unique_email
from .test_password_reset import NEW_PASSWORD, emailed_reset_tokens, forgot

OWASP_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"


async def test_default_settings_hash_with_owasp_argon2id() -> None:
    passwords = Passwords.from_settings(Settings())
    hashed = await passwords.hash("correct horse battery")
    assert hashed.startswith(OWASP_PREFIX)
    assert await passwords.verify(hashed, "correct horse battery") is True
    assert await passwords.verify(hashed, "wrong horse battery") is False
    assert passwords.needs_rehash(hashed) is False


async def test_a_garbage_hash_never_verifies() -> None:
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1)
    assert await passwords.verify("not-a-hash", "anything at all") is False


async def test_login_upgrades_a_hash_made_with_older_parameters(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    account = await register(client)  # hashed with the suite's cheap parameters
    owasp = Passwords.from_settings(Settings())
    async with sessionmaker() as session:
        old_hash = await session.scalar(select(User.password_hash).where(User.id == account.id))
        assert old_hash is not None
        assert not old_hash.startswith(OWASP_PREFIX)
        user = await service.authenticate(
            session=session, passwords=owasp, email=account.email, password=account.password
        )
        assert user.id.hex == account.id.replace("-", "")
    async with sessionmaker() as session:
        new_hash = await session.scalar(select(User.password_hash).where(User.id == account.id))
    assert new_hash is not None
    assert new_hash.startswith(OWASP_PREFIX)
    assert await owasp.verify(new_hash, account.password)


async def test_a_wrong_password_leaves_the_old_hash(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    account = await register(client)
    owasp = Passwords.from_settings(Settings())
    async with sessionmaker() as session:
        before = await session.scalar(select(User.password_hash).where(User.id == account.id))
        try:
            await service.authenticate(
                session=session, passwords=owasp, email=account.email, password="wrong one!"
            )
        except InvalidCredentials:
            pass
        else:
            raise AssertionError("a wrong password authenticated")
        after = await session.scalar(select(User.password_hash).where(User.id == account.id))
    assert before == after


async def test_hashing_runs_off_the_event_loop() -> None:
    """A coroutine scheduled right after a hash starts runs before the hash ends;
    a hash computed on the loop itself would have finished first."""
    passwords = Passwords.from_settings(Settings())
    hashing = asyncio.create_task(passwords.hash("some password"))

    async def observe() -> bool:
        return hashing.done()

    observer = asyncio.create_task(observe())
    assert await observer is False
    assert (await hashing).startswith(OWASP_PREFIX)


class CountingHasher:
    """Stands in for argon2's hasher: counts the hashes in progress at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def hash(self, password: str) -> str:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)  # long enough for the others to pile up meanwhile
            return f"hashed:{password}"
        finally:
            with self.lock:
                self.running -= 1


async def test_at_most_max_concurrent_hashes_run_at_once() -> None:
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1, max_concurrent=3)
    counting = CountingHasher()
    passwords.hasher = counting  # type: ignore[assignment]

    hashes = await asyncio.gather(*(passwords.hash(f"password {n}") for n in range(12)))

    assert counting.most == 3
    assert len(set(hashes)) == 12


class WatchedPasswords:
    """The app's `Passwords`, noting for each hash or check whether the
    request's session held a connection (a transaction) while it ran."""

    def __init__(self, passwords: Passwords, session: AsyncSession, seen: list[str]) -> None:
        self._passwords = passwords
        self._session = session
        self._seen = seen

    def _note(self, what: str) -> None:
        self._seen.append(f"{what} holding" if self._session.in_transaction() else what)

    async def hash(self, password: str) -> str:
        self._note("hash")
        return await self._passwords.hash(password)

    async def verify(self, password_hash: str, password: str) -> bool:
        self._note("verify")
        return await self._passwords.verify(password_hash, password)

    async def burn_verify(self, password: str) -> None:
        self._note("burn_verify")
        await self._passwords.burn_verify(password)

    def needs_rehash(self, password_hash: str) -> bool:
        return self._passwords.needs_rehash(password_hash)


async def test_no_connection_is_held_while_a_password_is_hashed_or_checked(
    app: FastAPI, client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    """A hash takes a slot that may be queued for; a request waiting for one
    with a connection (and a transaction's locks) in hand would starve every
    other request of the pool. Registration, logins (right, wrong, unknown
    account) and a reset each check or hash with the session's transaction
    ended."""
    seen: list[str] = []

    def watched(request: Request, session: SessionDep) -> Passwords:
        # the same session the route gets: FastAPI makes one per request
        return cast(Passwords, WatchedPasswords(request.state.passwords, session, seen))

    app.dependency_overrides[get_passwords] = watched
    try:
        account = await register(client)
        await login(client, account.email, account.password)
        wrong = {"username": account.email, "password": account.password + "!"}
        assert (await client.post("/auth/token", data=wrong)).status_code == 400
        unknown = {"username": unique_email(), "password": account.password}
        assert (await client.post("/auth/token", data=unknown)).status_code == 400
        await forgot(client, account.email)
        (token,) = await emailed_reset_tokens(mail, account.email)
        reset = await client.post(
            "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
        )
        assert reset.status_code == 204, reset.text
    finally:
        app.dependency_overrides.pop(get_passwords, None)
    assert seen == ["hash", "verify", "verify", "burn_verify", "hash"]
