"""Readiness waits for the schema: on a real PostgreSQL, a replica whose
database is behind its code is not ready, and is once the migration ran."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from kit.db import (
    ensure_database,
    make_engine,
    make_sessionmaker,
    purge_now_and_then,
    schema_check,
)
from kit.errors import install_problem_handlers
from kit.health import health_router
from kit_testing import started, unique_database_url

REVISIONS = ("0001", "0002", "0003")


@pytest.fixture
async def engine(postgres_server_url: str) -> AsyncIterator[AsyncEngine]:
    url = unique_database_url(postgres_server_url, "schema_check")
    await ensure_database(url)
    engine = make_engine(url, pool_size=1, max_overflow=0)
    yield engine
    await engine.dispose()


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"engine": engine}

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)
    app.include_router(health_router({"schema": schema_check(REVISIONS)}))
    async with (
        started(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://svc"
        ) as http,
    ):
        yield http


async def set_version(engine: AsyncEngine, version: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text("CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32) NOT NULL)")
        )
        await connection.execute(text("DELETE FROM alembic_version"))
        await connection.execute(
            text("INSERT INTO alembic_version VALUES (:version)"), {"version": version}
        )


async def test_not_ready_before_any_migration(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "schema": "failed: RuntimeError: no schema yet; this code needs 0003"
    }


async def test_not_ready_while_the_schema_is_behind_then_ready_once_migrated(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await set_version(engine, "0002")
    behind = await client.get("/readyz")
    await set_version(engine, "0003")
    at_head = await client.get("/readyz")

    assert behind.status_code == 503
    assert behind.json()["checks"] == {
        "schema": "failed: RuntimeError: schema at 0002; this code needs 0003"
    }
    assert at_head.status_code == 200
    assert at_head.json()["checks"] == {"schema": "ok"}


async def test_ready_when_a_newer_release_migrated_first(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await set_version(engine, "0004")

    response = await client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["checks"] == {"schema": "ok"}


async def test_an_empty_version_table_is_no_schema(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await set_version(engine, "0001")
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM alembic_version"))

    response = await client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "schema": "failed: RuntimeError: schema at none; this code needs 0003"
    }


async def test_a_purge_runs_every_interval_and_outlives_a_failure(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Each run in a session of its own; a failure (the database away) is
    logged, and the next interval runs it again."""
    runs: list[int] = []
    done = asyncio.Event()

    async def purge(session: AsyncSession) -> int:
        runs.append(await session.scalar(text("SELECT 1")) or 0)
        if len(runs) == 2:
            raise ConnectionRefusedError("the database is away")
        if len(runs) == 4:
            done.set()
        return 3

    caplog.set_level(logging.INFO, logger="kit.db")
    task = asyncio.create_task(
        purge_now_and_then(make_sessionmaker(engine), purge, interval_seconds=0.01, what="old rows")
    )
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert runs == [1, 1, 1, 1]
    messages = [record.getMessage() for record in caplog.records]
    assert "purging old rows failed: the database is away" in messages
    assert messages.count("purged 3 old rows") == 2
