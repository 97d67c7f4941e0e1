"""Password resets: the emailed token, its single use, and what a reset ends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from jose import jwt
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.models import PasswordReset, User
from auth.tokens import opaque_token_hash
from kit_testing import MailCatcher, emailed_token

from .factories import Account, login, register, registered_and_logged_in, unique_email

NEW_PASSWORD = "a brand new passphrase"


def reset_tokens(mail: MailCatcher, email: str) -> list[str]:
    """The tokens of every reset email `email` got, oldest first."""
    return [
        emailed_token(message)
        for message in mail.to(email)
        if message["Subject"] == "Reset your Bazaar password"
    ]


async def emailed_reset_tokens(mail: MailCatcher, email: str, count: int = 1) -> list[str]:
    """Waits for the `count`-th reset email to `email` (it goes out after the response)."""
    deadline = asyncio.get_running_loop().time() + 20
    while len(tokens := reset_tokens(mail, email)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(tokens)} reset emails"
        await asyncio.sleep(0.02)
    return tokens


async def forgot(client: httpx.AsyncClient, email: str) -> None:
    response = await client.post("/auth/password/forgot", json={"email": email})
    assert response.status_code == 202, response.text
    assert response.content == b""


async def account_with_reset_token(
    client: httpx.AsyncClient, mail: MailCatcher
) -> tuple[Account, str]:
    """A new account that has asked for one reset, and the token it was emailed."""
    account = await register(client)
    await forgot(client, account.email)
    (token,) = await emailed_reset_tokens(mail, account.email)
    return account, token


async def test_a_reset_sets_the_new_password_and_ends_every_session(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account, tokens = await registered_and_logged_in(client)
    await forgot(client, account.email.upper())  # any spelling of the address
    (token,) = await emailed_reset_tokens(mail, account.email)

    response = await client.post(
        "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
    )
    assert response.status_code == 204, response.text

    old = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert old.status_code == 400
    assert old.json()["error"] == "invalid_grant"
    fresh = await login(client, account.email, NEW_PASSWORD)
    assert (await client.get("/auth/users/me", headers=fresh.headers)).status_code == 200
    # the sessions from before the reset are over, access and refresh alike
    assert (await client.get("/auth/users/me", headers=tokens.headers)).status_code == 401
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert refreshed.status_code == 401


async def test_a_reset_verifies_the_address_its_token_was_emailed_to(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    # someone registered an address that is not theirs and never verified it;
    # its owner asks for a reset and takes the account back
    squatter = await register(client)
    squatter_session = await login(client, squatter.email, squatter.password)
    unverified = await client.get("/auth/users/me", headers=squatter_session.headers)
    assert unverified.json()["email_verified"] is False
    await forgot(client, squatter.email)
    (token,) = await emailed_reset_tokens(mail, squatter.email)

    body = {"token": token, "password": NEW_PASSWORD}
    assert (await client.post("/auth/password/reset", json=body)).status_code == 204

    owner = await login(client, squatter.email, NEW_PASSWORD)
    assert jwt.get_unverified_claims(owner.access)["email_verified"] is True
    me = await client.get("/auth/users/me", headers=owner.headers)
    assert me.json()["email_verified"] is True
    # and the squatter's session is over
    assert (await client.get("/auth/users/me", headers=squatter_session.headers)).status_code == 401


async def test_a_token_works_once_and_spends_the_others(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account = await register(client)
    await forgot(client, account.email)
    await forgot(client, account.email)
    first, second = await emailed_reset_tokens(mail, account.email, 2)
    body = {"token": second, "password": NEW_PASSWORD}
    assert (await client.post("/auth/password/reset", json=body)).status_code == 204

    for token in (second, first):
        again = await client.post(
            "/auth/password/reset", json={"token": token, "password": "yet another one"}
        )
        assert again.status_code == 400
        assert again.headers["content-type"] == "application/problem+json"
        assert again.json()["detail"] == (
            "This password reset token is invalid, expired or already used"
        )
    await login(client, account.email, NEW_PASSWORD)


async def test_an_unknown_email_is_answered_alike_and_gets_nothing(
    client: httpx.AsyncClient,
    mail: MailCatcher,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    nobody = unique_email("nobody")
    await forgot(client, nobody)
    await forgot(client, "not an email at all")
    # the email goes out before the in-process client has its answer
    assert mail.to(nobody) == []
    assert mail.to("not an email at all") == []
    async with sessionmaker() as session:
        assert await session.scalar(select(User).where(User.email == nobody)) is None


async def test_an_expired_token_is_refused(
    client: httpx.AsyncClient,
    mail: MailCatcher,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    account, token = await account_with_reset_token(client, mail)
    async with sessionmaker() as session:
        stored = await session.scalar(
            select(PasswordReset).where(PasswordReset.token_hash == opaque_token_hash(token))
        )
        assert stored is not None  # only the digest is stored, never the token
        lifetime = stored.expires_at - stored.created_at
        assert abs(lifetime - timedelta(seconds=1800)) < timedelta(seconds=5)
        await session.execute(
            update(PasswordReset)
            .where(PasswordReset.id == stored.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
    response = await client.post(
        "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
    )
    assert response.status_code == 400
    await login(client, account.email, account.password)


async def test_a_deactivated_account_cannot_reset(
    client: httpx.AsyncClient,
    mail: MailCatcher,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    account, token = await account_with_reset_token(client, mail)
    async with sessionmaker() as session:
        await session.execute(
            update(User).where(User.email == account.email).values(is_active=False)
        )
        await session.commit()
    response = await client.post(
        "/auth/password/reset", json={"token": token, "password": NEW_PASSWORD}
    )
    assert response.status_code == 400
    await forgot(client, account.email)
    assert len(reset_tokens(mail, account.email)) == 1  # and no new email


async def test_reset_emails_per_account_are_limited_without_telling(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account = await register(client)
    for _ in range(5):
        await forgot(client, account.email)
    assert len(reset_tokens(mail, account.email)) == 3  # the window's limit


async def test_reset_emails_asked_for_while_the_database_was_away_spend_no_allowance(
    client: httpx.AsyncClient, mail: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ask answered 503 (retry, as told) gives its count back: after as
    many failures as the window allows, the owner still gets the email."""
    account = await register(client)
    request_password_reset = service.request_password_reset

    async def database_away(**arguments: object) -> None:
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(service, "request_password_reset", database_away)
    failed = [
        (await client.post("/auth/password/forgot", json={"email": account.email})).status_code
        for _ in range(3)
    ]
    monkeypatch.setattr(service, "request_password_reset", request_password_reset)
    await forgot(client, account.email)

    assert failed == [503, 503, 503]
    assert len(await emailed_reset_tokens(mail, account.email)) == 1


async def test_a_frozen_redis_costs_a_reset_email_ask_a_503_not_a_hang(
    client: httpx.AsyncClient, mail: MailCatcher, redis_url: str
) -> None:
    """Redis takes no write (paused) for longer than a command may wait: the
    ask for a reset email, which must be counted before it goes, answers 503
    rather than waiting for Redis; asked again once Redis answers, it goes."""
    account = await register(client)
    redis = Redis.from_url(redis_url)
    try:
        await redis.client_pause(8000, all=False)  # writes wait; reads go on
        frozen = await client.post("/auth/password/forgot", json={"email": account.email})
    finally:
        await redis.client_unpause()
        await redis.aclose()

    assert frozen.status_code == 503
    assert frozen.headers["content-type"] == "application/problem+json"
    assert reset_tokens(mail, account.email) == []
    await forgot(client, account.email)
    assert len(await emailed_reset_tokens(mail, account.email)) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"token": "x", "password": "short"}, "password"),
        ({"token": "", "password": NEW_PASSWORD}, "token"),
        ({"token": "x" * 257, "password": NEW_PASSWORD}, "token"),
        ({"password": NEW_PASSWORD}, "token"),
    ],
)
async def test_malformed_resets_are_validation_problems(
    client: httpx.AsyncClient, body: dict[str, str], field: str
) -> None:
    response = await client.post("/auth/password/reset", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert ["body", field] in [error["loc"] for error in response.json()["errors"]]


async def test_the_new_password_must_not_be_the_email(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account, token = await account_with_reset_token(client, mail)
    response = await client.post(
        "/auth/password/reset", json={"token": token, "password": account.email}
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "password"]
    # the token was not spent by the refused attempt
    body = {"token": token, "password": NEW_PASSWORD}
    assert (await client.post("/auth/password/reset", json=body)).status_code == 204
