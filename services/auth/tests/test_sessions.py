"""A login session's absolute end: refresh rotation never carries it further."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import kit.db
from auth import service
from auth.main import create_app
from auth.models import EmailVerification, PasswordReset, RefreshToken
from auth.tokens import opaque_token_hash
from kit_testing import MailCatcher, started

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, make_settings, wait_until_ready
from .factories import login, register
from .test_password_reset import emailed_reset_tokens, forgot
from .test_router import assert_problem


@contextlib.asynccontextmanager
async def app_with_sessions_of(
    seconds: int, database_url: str, redis_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(database_url, redis_url, session_max_lifetime_seconds=seconds)
    async with (
        started(create_app(settings)) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://auth"
        ) as client,
    ):
        await wait_until_ready(client)
        yield client


async def family_rows(
    sessionmaker: async_sessionmaker[AsyncSession], refresh_token: str
) -> list[RefreshToken]:
    async with sessionmaker() as session:
        first = await session.scalar(
            select(RefreshToken).where(RefreshToken.token_hash == opaque_token_hash(refresh_token))
        )
        assert first is not None
        return list(
            (
                await session.scalars(
                    select(RefreshToken).where(RefreshToken.family_id == first.family_id)
                )
            ).all()
        )


async def test_rotation_cannot_extend_a_session_past_its_end(
    database_url: str, redis_url: str, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with app_with_sessions_of(2, database_url, redis_url) as client:
        tokens = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
        first_refresh, refresh = tokens.refresh, tokens.refresh
        rotations = 0
        deadline = time.monotonic() + 20
        while True:
            response = await client.post("/auth/refresh", json={"refresh_token": refresh})
            if response.status_code == 401:
                break
            assert response.status_code == 200, response.text
            refresh = response.json()["refresh_token"]
            rotations += 1
            assert time.monotonic() < deadline, "the session outlived its end"
            await asyncio.sleep(0.1)  # a client refreshing eagerly

    assert rotations > 0
    rows = await family_rows(sessionmaker, first_refresh)
    assert len(rows) == rotations + 1
    (end,) = {row.session_expires_at for row in rows}
    assert end is not None
    assert all(row.expires_at <= end for row in rows)
    assert end - min(row.created_at for row in rows) < timedelta(seconds=3)


async def test_a_session_from_before_absolute_ends_gets_one_at_its_next_rotation(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    tokens = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    async with sessionmaker() as session:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.token_hash == opaque_token_hash(tokens.refresh))
            .values(session_expires_at=None)
        )
        await session.commit()

    response = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})

    assert response.status_code == 200, response.text
    rows = await family_rows(sessionmaker, tokens.refresh)
    newest = max(rows, key=lambda row: row.created_at)
    assert newest.session_expires_at is not None
    lifetime = newest.session_expires_at - newest.created_at
    assert abs(lifetime - timedelta(days=30)) < timedelta(seconds=5)


async def test_tokens_a_day_past_their_expiry_are_purged_and_live_ones_kept(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    mail: MailCatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = await register(client)
    await mail.wait_for(account.email)  # its verification token's row is written
    first = await login(client, account.email, account.password)
    second = (await client.post("/auth/refresh", json={"refresh_token": first.refresh})).json()
    third = (
        await client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    ).json()
    await forgot(client, account.email)
    await emailed_reset_tokens(mail, account.email)
    long_ago = datetime.now(UTC) - timedelta(days=1, minutes=1)
    spent = [opaque_token_hash(first.refresh), opaque_token_hash(second["refresh_token"])]
    async with sessionmaker() as session:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.token_hash.in_(spent))
            .values(expires_at=long_ago)
        )
        for model in (PasswordReset, EmailVerification):
            await session.execute(
                update(model)
                .where(model.user_id == uuid.UUID(account.id))
                .values(expires_at=long_ago)
            )
        await session.commit()
        monkeypatch.setattr(kit.db, "PURGE_BATCH", 1)  # a batch at a time, all of them
        assert await service.purge_expired_tokens(session=session) >= 4

        left = await session.scalars(
            select(RefreshToken.token_hash).where(RefreshToken.user_id == uuid.UUID(account.id))
        )
        assert list(left) == [opaque_token_hash(third["refresh_token"])]
        for model in (PasswordReset, EmailVerification):
            rows = await session.scalars(
                select(model.id).where(model.user_id == uuid.UUID(account.id))
            )
            assert list(rows) == []
    # the session lives on; the purged token is unknown, not a reuse that ends it
    assert_problem(await client.post("/auth/refresh", json={"refresh_token": first.refresh}), 401)
    refreshed = await client.post("/auth/refresh", json={"refresh_token": third["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
