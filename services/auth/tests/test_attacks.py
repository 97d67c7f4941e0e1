"""Every forged, stale or revoked credential is refused with 401 problem+json."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from jose import jwt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.models import SigningKey
from kit.settings import DEFAULT_JWT_ISSUER
from kit_testing import TokenMinter

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from .factories import login, register, registered_and_logged_in
from .test_router import assert_problem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


async def signing_key(sessionmaker: async_sessionmaker[AsyncSession]) -> SigningKey:
    async with sessionmaker() as session:
        key = await session.scalar(select(SigningKey).where(SigningKey.retired_at.is_(None)))
    assert key is not None
    assert key.private_pem is not None
    return key


async def forged(sessionmaker: async_sessionmaker[AsyncSession], **overrides: Any) -> str:
    """A token signed with auth's real key but with claims of the test's choosing."""
    key = await signing_key(sessionmaker)
    now = int(time.time())
    claims = {
        "sub": str(uuid.uuid4()),
        "name": "Mallory",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "iss": DEFAULT_JWT_ISSUER,
        "aud": "bazaar",
        "typ": "access",
        **overrides,
    }
    token: str = jwt.encode(claims, key.private_pem, algorithm="ES256", headers={"kid": key.kid})
    return token


async def refused(client: httpx.AsyncClient, token: str) -> str:
    response = await client.get("/auth/users/me", headers={"Authorization": f"Bearer {token}"})
    body = assert_problem(response, 401)
    return str(body["detail"])


async def test_a_real_key_signed_token_is_accepted(
    client: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """The control for the forgeries below: `forged` itself makes valid tokens."""
    account = await register(client)
    token = await forged(sessionmaker, sub=account.id)
    response = await client.get("/auth/users/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["id"] == account.id


async def test_alg_none_is_refused(client: httpx.AsyncClient) -> None:
    _account, tokens = await registered_and_logged_in(client)
    claims = jwt.get_unverified_claims(tokens.access)
    kid = jwt.get_unverified_header(tokens.access)["kid"]
    token = unsigned({"alg": "none", "kid": kid, "typ": "JWT"}, {**claims, "roles": ["admin"]})
    assert await refused(client, token) == "Token algorithm is not allowed"


@pytest.mark.parametrize("alg", [["ES256"], {"ES256": True}, None, 256])
async def test_a_header_alg_that_is_not_a_string_is_refused_everywhere(
    client: httpx.AsyncClient, alg: object
) -> None:
    """A JWT header is any JSON; an alg no set can hold is a 401, not a 500."""
    _account, tokens = await registered_and_logged_in(client)
    kid = jwt.get_unverified_header(tokens.access)["kid"]
    token = unsigned({"alg": alg, "kid": kid}, jwt.get_unverified_claims(tokens.access))
    assert await refused(client, token) == "Token algorithm is not allowed"
    bearer = {"Authorization": f"Bearer {token}"}
    assert_problem(await client.post("/auth/logout", headers=bearer), 401)
    assert_problem(await client.get("/auth/userinfo", headers=bearer), 401)
    # as the token of a revocation or an introspection: not a live token of ours
    revoked = await client.post("/auth/revoke", data={"token": token})
    assert revoked.status_code == 200, revoked.text


async def test_hs256_signed_with_the_public_key_is_refused(client: httpx.AsyncClient) -> None:
    _account, tokens = await registered_and_logged_in(client)
    kid = jwt.get_unverified_header(tokens.access)["kid"]
    jwks = (await client.get("/auth/.well-known/jwks.json")).json()
    (public,) = [key for key in jwks["keys"] if key["kid"] == kid]
    claims = {**jwt.get_unverified_claims(tokens.access), "roles": ["admin"]}
    for secret in (json.dumps(public).encode(), public["x"].encode()):
        header = {"alg": "HS256", "kid": kid, "typ": "JWT"}
        head = b64(json.dumps(header).encode())
        body = b64(json.dumps(claims).encode())
        mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        assert await refused(client, f"{head}.{body}.{b64(mac)}") == (
            "Token algorithm is not allowed"
        )


async def test_a_tampered_payload_is_refused(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    head, _, signature = tokens.access.split(".")
    claims = {**jwt.get_unverified_claims(tokens.access), "roles": ["admin", "user"]}
    token = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
    assert await refused(client, token) == "Invalid token"


async def test_an_unknown_kid_is_refused(client: httpx.AsyncClient) -> None:
    token = TokenMinter().token(roles=("admin",))
    assert await refused(client, token) == "Token signed by an unknown key"


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"iss": "someone-else"}, "Token claims are invalid"),
        ({"aud": "another-audience"}, "Token claims are invalid"),
        ({"iat": 1_000, "exp": 2_000}, "Token expired"),
        ({"typ": "refresh"}, "Not an access token"),
    ],
)
async def test_wrong_claims_are_refused(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    overrides: dict[str, Any],
    detail: str,
) -> None:
    account = await register(client)
    token = await forged(sessionmaker, sub=account.id, **overrides)
    assert await refused(client, token) == detail


async def test_a_logged_out_token_is_refused(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    assert (await client.post("/auth/logout", headers=tokens.headers)).status_code == 204
    assert await refused(client, tokens.access) == "Token revoked"
    # logging out twice is refused too, the token being dead
    assert_problem(await client.post("/auth/logout", headers=tokens.headers), 401)


async def test_a_reused_refresh_token_revokes_the_whole_family(
    client: httpx.AsyncClient,
) -> None:
    _, tokens = await registered_and_logged_in(client)
    first = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert first.status_code == 200
    newer = first.json()
    replay = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    detail = assert_problem(replay, 401)["detail"]
    assert detail == "Refresh token was already used; the session is revoked"
    # the token that replaced it is dead too, and so are the family's access tokens
    after = await client.post("/auth/refresh", json={"refresh_token": newer["refresh_token"]})
    assert_problem(after, 401)
    assert await refused(client, newer["access_token"]) == "Token revoked"
    assert await refused(client, tokens.access) == "Token revoked"


async def test_two_concurrent_uses_of_one_refresh_token_cannot_both_succeed(
    client: httpx.AsyncClient,
) -> None:
    _, tokens = await registered_and_logged_in(client)
    responses = await asyncio.gather(
        *(client.post("/auth/refresh", json={"refresh_token": tokens.refresh}) for _ in range(2))
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 401]
    (winner,) = [response.json() for response in responses if response.status_code == 200]
    # the loser's replay revoked the family, the winner's new token included
    after = await client.post("/auth/refresh", json={"refresh_token": winner["refresh_token"]})
    assert_problem(after, 401)


async def test_a_deactivated_user_is_locked_out_at_once(client: httpx.AsyncClient) -> None:
    account, tokens = await registered_and_logged_in(client)
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    response = await client.patch(
        f"/auth/users/{account.id}", json={"is_active": False}, headers=admin.headers
    )
    assert response.status_code == 200
    assert response.json()["is_active"] is False
    assert await refused(client, tokens.access) == "Token revoked"
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert_problem(refreshed, 401)
    again = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert assert_problem(again, 400)["detail"] == "Incorrect email or password"


async def test_a_malformed_token_is_refused(client: httpx.AsyncClient) -> None:
    assert await refused(client, "not.a.jwt") == "Malformed token"
