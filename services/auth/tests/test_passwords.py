from __future__ import annotations

import asyncio
import threading
import time

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.config import Settings
from auth.errors import InvalidCredentials
from auth.models import User
from auth.passwords import Passwords

from .factories import register

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
