"""The database going away and coming back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from catalog.config import Settings

from .conftest import app_client
from .factories import create_product, product_body

if TYPE_CHECKING:
    from kit_testing import Service, TokenMinter


async def test_reads_and_writes_recover_after_a_database_restart(
    committed_client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    postgres_service: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kit_testing import wait_for_postgres

    created = await create_product(committed_client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    assert (await committed_client.get(url)).status_code == 200

    await asyncio.to_thread(postgres_service.restart)
    await wait_for_postgres(f"postgresql://test:test@127.0.0.1:{postgres_service.port}/test")

    # every pooled connection died with the server: each pool replaces its own
    # (or a read retries once on a fresh one) and nothing reaches the client
    response = await committed_client.get(url)
    assert response.status_code == 200, response.text
    assert response.json() == created
    listed = await committed_client.get("/catalog/products", params={"q": created["name"]})
    assert listed.json()["items"] == [created]
    # the engine's pool (category reads, writes) still held dead connections:
    # the read retried on a fresh one
    categories = await committed_client.get("/catalog/categories")
    assert categories.status_code == 200, categories.text
    assert "database connection lost" in caplog.text
    again = await committed_client.post(
        "/catalog/products", json=product_body(), headers=admin_headers
    )
    assert again.status_code == 201


async def test_a_statement_past_the_statement_timeout_answers_503_and_a_retry_succeeds(
    settings: Settings,
    minter: TokenMinter,
    admin_headers: dict[str, str],
    engine: AsyncEngine,
) -> None:
    """A table another transaction holds (or a scan no index narrows): the
    request's statement is cancelled after DATABASE_STATEMENT_TIMEOUT_SECONDS,
    the client hears 503 with Retry-After, and once the table is free the
    same requests succeed, a create with its Idempotency-Key exactly once."""
    async with app_client(settings, minter, database_statement_timeout_seconds=0.2) as client:
        created = await create_product(client, admin_headers)
        url = f"/catalog/products/{created['id']}"
        body = product_body()
        once = {**admin_headers, "Idempotency-Key": body["name"]}
        async with engine.connect() as holder:
            transaction = await holder.begin()
            try:
                await holder.execute(text("LOCK TABLE products IN ACCESS EXCLUSIVE MODE"))
                refused = [
                    await client.get(url),
                    await client.get("/catalog/products", params={"q": created["name"]}),
                    await client.post("/catalog/products", json=body, headers=once),
                ]
            finally:
                await transaction.rollback()
        assert_retry_later(refused)
        assert (await client.get(url)).json() == created
        await assert_created_once(client, body, once)


async def test_a_frozen_database_answers_503_and_a_retry_succeeds(
    settings: Settings,
    minter: TokenMinter,
    admin_headers: dict[str, str],
    postgres_service: Service,
) -> None:
    """PostgreSQL takes connections and answers nothing (cut off by the
    network, or stuck): its statement timeout cannot fire. Every read path
    (a point read, the list, the engine's categories) and a create answer 503
    within the command timeout, never waiting for the database to come back,
    and once it answers again the same requests succeed, the create with its
    Idempotency-Key exactly once."""
    async with app_client(
        settings,
        minter,
        database_statement_timeout_seconds=0.5,
        database_command_timeout_seconds=1,
    ) as client:
        created = await create_product(client, admin_headers)
        url = f"/catalog/products/{created['id']}"
        body = product_body()
        once = {**admin_headers, "Idempotency-Key": body["name"]}
        assert (await client.get("/catalog/categories")).status_code == 200

        async with postgres_service.frozen(), asyncio.timeout(20):
            refused = await asyncio.gather(
                client.get(url),
                client.get("/catalog/products", params={"q": created["name"]}),
                client.get("/catalog/categories"),
                client.post("/catalog/products", json=body, headers=once),
            )
        assert_retry_later(refused)
        assert (await client.get(url)).json() == created
        assert (await client.get("/catalog/categories")).status_code == 200
        await assert_created_once(client, body, once)


def assert_retry_later(responses: Sequence[httpx.Response]) -> None:
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "1"
        assert response.json()["type"] == "urn:problem-type:service-unavailable"


async def assert_created_once(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> None:
    """A create refused earlier, asked for again with its Idempotency-Key: one
    product, and the same key once more replays it."""
    first = await client.post("/catalog/products", json=body, headers=headers)
    assert first.status_code == 201, first.text
    replayed = await client.post("/catalog/products", json=body, headers=headers)
    assert replayed.json() == first.json()
    listed = await client.get("/catalog/products", params={"q": body["name"]})
    assert [item["id"] for item in listed.json()["items"]] == [first.json()["id"]]
