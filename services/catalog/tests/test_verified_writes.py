"""REQUIRE_VERIFIED_EMAIL: catalog writes need a token that vouches for the email."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from kit_testing import TokenMinter

from .conftest import app_client, make_settings


@pytest.fixture
async def strict_client(
    database_url: str, redis_url: str, minter: TokenMinter
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(database_url, redis_url, require_verified_email=True)
    async with app_client(settings, minter) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_unverified_admin_cannot_write_but_can_read(
    strict_client: httpx.AsyncClient, minter: TokenMinter
) -> None:
    unverified = bearer(minter.token(roles=("admin",), email_verified=False))

    refused = await strict_client.post(
        "/catalog/products", json={"name": "Unverified Lamp", "price": "3"}, headers=unverified
    )

    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:problem-type:email-not-verified"
    category = await strict_client.post(
        "/catalog/categories", json={"slug": "unverified", "name": "No"}, headers=unverified
    )
    assert category.status_code == 403
    listed = await strict_client.get("/catalog/products", headers=unverified)
    assert listed.status_code == 200


async def test_a_verified_admin_writes(
    strict_client: httpx.AsyncClient, minter: TokenMinter
) -> None:
    verified = bearer(minter.token(roles=("admin",), email_verified=True))
    name = "Verified " + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])

    created = await strict_client.post(
        "/catalog/products", json={"name": name, "price": "3"}, headers=verified
    )

    assert created.status_code == 201, created.text


async def test_without_the_setting_an_unverified_admin_writes(
    client: httpx.AsyncClient, minter: TokenMinter
) -> None:
    unverified = bearer(minter.token(roles=("admin",), email_verified=False))

    created = await client.post(
        "/catalog/products", json={"name": "Open Lamp", "price": "3"}, headers=unverified
    )

    assert created.status_code == 201, created.text
