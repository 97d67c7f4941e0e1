"""The app as a whole: health, readiness, shared headers, concurrency on writes."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from .conftest import SERVICE_DIR, app_client
from .factories import create_product
from .test_router import assert_problem

if TYPE_CHECKING:
    from kit_testing import TokenMinter


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "schema": "ok"},
        "optional": {"keys": "ok", "revocations": "ok"},
    }


async def test_starts_without_its_database_and_redis_and_says_not_ready(settings: Any) -> None:
    from kit_testing import free_port

    unreachable = settings.model_copy(
        update={
            "database_url": f"postgresql+asyncpg://x:y@127.0.0.1:{free_port()}/catalog",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        }
    )
    async with app_client(unreachable) as client:
        assert (await client.get("/healthz")).status_code == 200
        problem = assert_problem(await client.get("/readyz"), 503)
        assert problem["checks"]["database"].startswith("failed")
        assert problem["optional"]["revocations"].startswith("Redis unreachable")
        for path in ("/catalog/products", f"/catalog/products/{uuid.uuid4()}"):
            response = await client.get(path)
            assert assert_problem(response, 503)["detail"] == "The database is unreachable; retry"
            assert response.headers["retry-after"] == "1"


async def test_ready_without_redis_public_reads_serve_and_writes_say_retry(
    settings: Any, minter: TokenMinter, admin_headers: dict[str, str]
) -> None:
    """Redis only backs the revocation check: its absence fails authenticated
    requests with a 503 to retry, never the replica's readiness or public reads."""
    from kit_testing import free_port

    without_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with app_client(settings, minter, redis_url=without_redis) as client:
        ready = await client.get("/readyz")
        listed = await client.get("/catalog/products")
        write = await client.post(
            "/catalog/products", json={"name": "lamp", "price": "3"}, headers=admin_headers
        )
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert ready.json()["checks"] == {"database": "ok", "schema": "ok"}
    assert ready.json()["optional"]["revocations"].startswith("Redis unreachable")
    assert listed.status_code == 200
    problem = assert_problem(write, 503)
    assert problem["detail"] == "Token revocation list is unreachable; retry"
    assert int(write.headers["retry-after"]) >= 1


async def test_responses_carry_request_id_and_timing(client: httpx.AsyncClient) -> None:
    response = await client.get("/catalog/products", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert float(response.headers["x-process-time"]) >= 0
    problem = assert_problem(
        await client.get("/catalog/products", params={"limit": 0}, headers={"X-Request-ID": "r1"}),
        422,
    )
    assert problem["instance"] == "r1"


async def test_of_two_patches_from_one_etag_exactly_one_wins(
    committed_client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(committed_client, admin_headers)
    headers = {**admin_headers, "If-Match": '"1"'}
    url = f"/catalog/products/{created['id']}"
    responses = await asyncio.gather(
        *(committed_client.patch(url, json={"price": price}, headers=headers) for price in "23")
    )
    assert sorted(response.status_code for response in responses) == [200, 412]
    winner = next(response for response in responses if response.status_code == 200)
    assert (await committed_client.get(url)).json() == winner.json()
    assert winner.json()["version"] == 2


async def test_not_ready_until_its_migration_ran_then_ready_without_a_restart(
    settings: Any, postgres_server_url: str
) -> None:
    """A replica started before its migrate step (Swarm and Kubernetes start
    both at once) must not serve, and must become ready by itself."""
    from kit.db import ensure_database
    from kit_testing import migrate, unique_database_url

    url = unique_database_url(postgres_server_url, "catalog_unmigrated")
    await ensure_database(url)
    async with app_client(settings, database_url=url) as client:
        before = await client.get("/readyz")
        await migrate(SERVICE_DIR, url)
        after = await client.get("/readyz")
        listed = await client.get("/catalog/products")

    problem = assert_problem(before, 503)
    assert problem["checks"]["database"] == "ok"
    assert (
        problem["checks"]["schema"] == "failed: RuntimeError: no schema yet; this code needs 0001"
    )
    assert after.status_code == 200
    assert listed.status_code == 200
