"""The database going away and coming back."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from .factories import create_product, product_body


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
