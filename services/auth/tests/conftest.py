from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auth.config import Settings
from auth.deps import client_address
from auth.main import create_app
from kit.db import make_engine, make_sessionmaker

if TYPE_CHECKING:
    from kit_testing import MailCatcher

pytest_plugins = ["kit_testing"]

SERVICE_DIR = Path(__file__).resolve().parents[1]
ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "admin-password-1"
# argon2id at a few hundred microseconds for bulk fixtures; OWASP's parameters
# are exercised on their own in test_passwords.py
CHEAP_ARGON2: dict[str, Any] = {"argon2_memory_cost_kib": 64, "argon2_time_cost": 1}
_addresses = itertools.count(1)
# confidential clients: a machine importer and a resource server that introspects
IMPORTER = ("catalog-importer", "importer-secret-0123456789")
RESOURCE_SERVER = ("reports", "reports/secret+with:odd chars")
OAUTH_CLIENTS: dict[str, Any] = {
    IMPORTER[0]: {"secret": IMPORTER[1], "scopes": ["catalog:import", "catalog:read"]},
    RESOURCE_SERVER[0]: {"secret": RESOURCE_SERVER[1], "introspect": True, "name": "Reports"},
}


def make_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "admin_email": ADMIN_EMAIL,
        "admin_password": ADMIN_PASSWORD,
        "login_failures_per_account_and_client": 3,
        "login_failures_per_client": 6,
        "login_failures_per_account": 10,
        "login_account_delay_max_seconds": 2,
        "log_level": "WARNING",
        "oauth_clients": OAUTH_CLIENTS,
        **CHEAP_ARGON2,
    }
    values.update(overrides)
    return Settings(**values)


async def fresh_database(postgres_server_url: str) -> str:
    # imported here: a top-level import would load the plugin before pytest
    # can rewrite its asserts
    from kit_testing import migrated_database

    return await migrated_database(postgres_server_url, SERVICE_DIR)


async def wait_until_ready(client: httpx.AsyncClient, *, within: float = 20.0) -> None:
    """The bootstrap (signing key, admin) runs in the background after start-up."""
    async with asyncio.timeout(within):
        while True:
            if (await client.get("/readyz")).status_code == 200:
                return
            await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
async def database_url(postgres_server_url: str) -> str:
    return await fresh_database(postgres_server_url)


@pytest.fixture(scope="session")
def mail() -> Iterator[MailCatcher]:
    """A real SMTP server that keeps every email the shared app sends."""
    from kit_testing import MailCatcher

    catcher = MailCatcher()
    catcher.start()
    yield catcher
    catcher.stop()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, mail: MailCatcher) -> Settings:
    return make_settings(database_url, redis_url, smtp_url=mail.url)


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=2, max_overflow=2)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    from kit_testing import started

    async with started(application) as manager:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://auth"
        ) as probe:
            await wait_until_ready(probe)
        application.state.asgi = manager.app
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Each test logs in from its own client address, so per-client login
    throttling in one test never spills into another."""
    number = next(_addresses)
    address = f"10.0.{number // 250}.{number % 250 + 1}"
    app.dependency_overrides[client_address] = lambda: address
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app.state.asgi), base_url="http://auth"
    ) as http:
        yield http
    app.dependency_overrides.pop(client_address, None)
