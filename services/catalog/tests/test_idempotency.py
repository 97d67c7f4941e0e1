"""`Idempotency-Key` on POST /catalog/products."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from catalog import service
from catalog.models import IdempotencyRecord, Product

from .factories import product_body
from .test_router import assert_problem


async def count_named(session: AsyncSession, name: str) -> int:
    return int(await session.scalar(select(func.count()).where(Product.name == name)) or 0)


async def test_same_key_and_body_replays_the_first_response(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    body = product_body()
    headers = {**admin_headers, "Idempotency-Key": "create-once"}
    first = await client.post("/catalog/products", json=body, headers=headers)
    second = await client.post("/catalog/products", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await count_named(session, body["name"].title()) == 1


async def test_replay_ignores_key_order_and_formatting(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = product_body(price="12.5", tags=["a"])
    headers = {**admin_headers, "Idempotency-Key": "formatting"}
    first = await client.post("/catalog/products", json=body, headers=headers)
    reordered = {"tags": [" A "], "price": 12.50, "name": body["name"]}
    second = await client.post("/catalog/products", json=reordered, headers=headers)
    assert second.status_code == 201
    assert second.json()["id"] == first.json()["id"]


async def test_same_key_with_another_body_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    headers = {**admin_headers, "Idempotency-Key": "reused"}
    first = await client.post("/catalog/products", json=product_body(), headers=headers)
    assert first.status_code == 201
    second = await client.post("/catalog/products", json=product_body(), headers=headers)
    problem = assert_problem(second, 422)
    assert problem["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert problem["errors"][0]["type"] == "idempotency_key_reused"


async def test_keys_belong_to_their_caller(client: httpx.AsyncClient, minter: object) -> None:
    from kit_testing import TokenMinter

    assert isinstance(minter, TokenMinter)
    body = product_body()
    responses = []
    for user in ("first-admin", "second-admin"):
        token = minter.token(user_id=user, roles=("admin",))
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "shared"}
        body["name"] = product_body()["name"]
        responses.append(await client.post("/catalog/products", json=body, headers=headers))
    assert [response.status_code for response in responses] == [201, 201]
    assert responses[0].json()["id"] != responses[1].json()["id"]


async def test_a_failed_create_does_not_store_the_key(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    headers = {**admin_headers, "Idempotency-Key": "failed-first"}
    body = product_body(category="missing")
    assert_problem(await client.post("/catalog/products", json=body, headers=headers), 422)
    body.pop("category")
    response = await client.post("/catalog/products", json=body, headers=headers)
    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers


async def test_an_expired_key_starts_afresh(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    headers = {**admin_headers, "Idempotency-Key": "expiring"}
    first = await client.post("/catalog/products", json=product_body(), headers=headers)
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == "expiring")
        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    await session.commit()
    second = await client.post("/catalog/products", json=product_body(), headers=headers)
    assert second.status_code == 201
    assert second.json()["id"] != first.json()["id"]


async def test_keys_expire_after_a_day(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    before = datetime.now(UTC)
    await client.post(
        "/catalog/products",
        json=product_body(),
        headers={**admin_headers, "Idempotency-Key": "ttl"},
    )
    expires_at = await session.scalar(
        select(IdempotencyRecord.expires_at).where(IdempotencyRecord.key == "ttl")
    )
    assert expires_at is not None
    assert timedelta(hours=23, minutes=59) < expires_at - before <= timedelta(hours=24, seconds=5)


async def test_purge_deletes_only_expired_keys(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    for key in ("old", "fresh"):
        await client.post(
            "/catalog/products",
            json=product_body(),
            headers={**admin_headers, "Idempotency-Key": key},
        )
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == "old")
        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    assert await service.purge_expired_idempotency_keys(session=session) == 1
    keys = await session.scalars(select(IdempotencyRecord.key))
    assert set(keys) == {"fresh"}


async def test_a_too_long_key_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/catalog/products",
        json=product_body(),
        headers={**admin_headers, "Idempotency-Key": "k" * 256},
    )
    assert assert_problem(response, 422)["errors"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_concurrent_requests_with_one_key_create_one_product(
    committed_client: httpx.AsyncClient, admin_headers: dict[str, str], engine: object
) -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine

    assert isinstance(engine, AsyncEngine)
    body = product_body()
    headers = {**admin_headers, "Idempotency-Key": f"race-{uuid.uuid4()}"}
    responses = await asyncio.gather(
        *(committed_client.post("/catalog/products", json=body, headers=headers) for _ in range(8))
    )
    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["id"] for response in responses}) == 1
    assert sum("idempotent-replayed" in response.headers for response in responses) == 7
    async with AsyncSession(engine) as session:
        assert await count_named(session, body["name"].title()) == 1
