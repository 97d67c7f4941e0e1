from __future__ import annotations

import asyncio

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
