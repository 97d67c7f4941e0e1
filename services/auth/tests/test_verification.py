"""Email verification: the emailed token, its single use, the claim, resends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from jose import jwt
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.models import EmailVerification
from auth.tokens import new_opaque_token, opaque_token_hash
from kit_testing import MailCatcher, emailed_token

from .factories import Account, Tokens, login, register, unique_email


async def registered_with_token(
    client: httpx.AsyncClient, mail: MailCatcher
) -> tuple[Account, str]:
    account = await register(client)
    (welcome,) = await mail.wait_for(account.email)
    return account, emailed_token(welcome)


async def verify(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/auth/email/verify", json={"token": token})


async def resend(client: httpx.AsyncClient, email: str) -> None:
    response = await client.post("/auth/email/verify/resend", json={"email": email})
    assert response.status_code == 202, response.text
    assert response.content == b""


def verified_claim(tokens: Tokens) -> object:
    return jwt.get_unverified_claims(tokens.access)["email_verified"]


async def test_the_emailed_token_verifies_the_address_and_new_tokens_say_so(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account, token = await registered_with_token(client, mail)
    before = await login(client, account.email, account.password)
    assert verified_claim(before) is False
    me = await client.get("/auth/users/me", headers=before.headers)
    assert me.json()["email_verified"] is False

    response = await verify(client, token)

    assert response.status_code == 204, response.text
    refreshed = await client.post("/auth/refresh", json={"refresh_token": before.refresh})
    assert jwt.get_unverified_claims(refreshed.json()["access_token"])["email_verified"] is True
    after = await login(client, account.email, account.password)
    assert verified_claim(after) is True
    me = await client.get("/auth/users/me", headers=after.headers)
    assert me.json()["email_verified"] is True


async def test_a_token_works_once_and_spends_the_others(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account, first = await registered_with_token(client, mail)
    await resend(client, account.email)
    _, again = await mail.wait_for(account.email, count=2)
    second = emailed_token(again)

    assert (await verify(client, second)).status_code == 204
    for spent in (second, first):
        refused = await verify(client, spent)
        assert refused.status_code == 400
        assert refused.json()["type"] == "urn:problem-type:invalid-verification-token"


async def test_an_expired_token_is_refused(
    client: httpx.AsyncClient,
    mail: MailCatcher,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    account, token = await registered_with_token(client, mail)
    async with sessionmaker() as session:
        stored = await session.scalar(
            select(EmailVerification).where(
                EmailVerification.token_hash == opaque_token_hash(token)
            )
        )
        assert stored is not None  # only the digest is stored
        assert abs(stored.expires_at - stored.created_at - timedelta(hours=24)) < timedelta(
            seconds=5
        )
        await session.execute(
            update(EmailVerification)
            .where(EmailVerification.id == stored.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()

    assert (await verify(client, token)).status_code == 400
    tokens = await login(client, account.email, account.password)
    assert verified_claim(tokens) is False


async def test_resending_answers_alike_and_mails_only_unverified_accounts(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    unverified = await register(client)
    verified, token = await registered_with_token(client, mail)
    assert (await verify(client, token)).status_code == 204
    nobody = unique_email("nobody")

    for email in (unverified.email.upper(), verified.email, nobody, "not an email at all"):
        await resend(client, email)

    # each email goes out before the in-process client has its answer
    assert len(mail.to(unverified.email)) == 2
    assert len(mail.to(verified.email)) == 1
    assert mail.to(nobody) == []


async def test_resends_per_address_are_limited_without_telling(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account = await register(client)
    for _ in range(5):
        await resend(client, account.email)

    # the welcome email, then the window's three resends
    assert len(mail.to(account.email)) == 4


async def test_malformed_verifications_are_validation_problems(client: httpx.AsyncClient) -> None:
    for body in ({}, {"token": ""}, {"token": "x" * 300}, {"token": "ok", "extra": 1}):
        response = await client.post("/auth/email/verify", json=body)
        assert response.status_code == 422, body
        assert response.headers["content-type"] == "application/problem+json"


async def test_a_registration_whose_commit_failed_is_registered_by_its_retry(
    client: httpx.AsyncClient, mail: MailCatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database lost while the account and its verification token are
    written: a 503, nothing of it kept, and the retry registers the account,
    welcome email and all (not a 409 for an account left without a token)."""

    def lost_once() -> str:
        monkeypatch.setattr(service, "new_opaque_token", new_opaque_token)
        raise ConnectionResetError("the database went away")

    monkeypatch.setattr(service, "new_opaque_token", lost_once)
    body = {"email": unique_email(), "password": "correct horse battery", "display_name": "Ada"}
    failed = await client.post("/auth/register", json=body)
    retried = await client.post("/auth/register", json=body)

    assert failed.status_code == 503
    assert retried.status_code == 201
    (welcome,) = await mail.wait_for(body["email"])
    assert (await verify(client, emailed_token(welcome))).status_code == 204
