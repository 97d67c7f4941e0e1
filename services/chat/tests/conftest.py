from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chat.config import Settings
from kit.db import make_engine

from .factories import Node, start_node

if TYPE_CHECKING:
    from kit_testing import TokenMinter

# kit_testing is imported inside the fixtures: pytest must load it as a plugin first
pytest_plugins = ["kit_testing"]

SERVICE_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minter() -> TokenMinter:
    from kit_testing import TokenMinter

    return TokenMinter()


@pytest.fixture(scope="session")
async def database_url(postgres_server_url: str) -> str:
    from kit_testing import migrated_database

    return await migrated_database(postgres_server_url, SERVICE_DIR)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine of the tests' own on the replicas' database."""
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def settings_for(database_url: str, redis_url: str) -> object:
    def build(node_id: str, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": database_url,
            "redis_url": redis_url,
            "node_id": node_id,
            "gap_fill_wait_ms": 30,
            "send_rate_per_second": 1000.0,
            "send_burst": 1000,
            "presence_heartbeat_seconds": 0.5,
            "presence_interval_seconds": 0.1,
            "bus_backoff_max_seconds": 0.5,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return build


@pytest.fixture(scope="session")
async def cluster(settings_for: object, minter: TokenMinter) -> AsyncIterator[list[Node]]:
    """Three replicas sharing one PostgreSQL and one Redis."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(start_node(settings_for(name), minter))  # type: ignore[operator]
            for name in ("node-a", "node-b", "node-c")
        ]
        yield nodes
