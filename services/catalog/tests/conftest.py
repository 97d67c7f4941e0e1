from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from catalog.config import Settings
from catalog.connections import Database, DatabaseOpener
from catalog.main import create_app
from kit.db import make_engine, open_unpinged_engine
from kit.lifespan import Parts

if TYPE_CHECKING:
    from kit_testing import TokenMinter

# kit_testing is imported lazily below: pytest must load it as a plugin first
pytest_plugins = ["kit_testing"]

SERVICE_DIR = Path(__file__).resolve().parents[1]
IMPORT_KEY = "import-key-for-tests"
BASE_URL = "http://catalog"


def make_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "catalog_api_key": IMPORT_KEY,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
async def database_url(postgres_server_url: str) -> str:
    from kit_testing import migrated_database

    return await migrated_database(postgres_server_url, SERVICE_DIR)


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    return make_settings(database_url, redis_url)


@pytest.fixture(scope="session")
def minter() -> TokenMinter:
    from kit_testing import TokenMinter

    return TokenMinter()


@pytest.fixture(scope="session")
def admin_headers(minter: TokenMinter) -> dict[str, str]:
    return {"Authorization": f"Bearer {minter.token(roles=('admin',), lifetime=3600)}"}


@pytest.fixture(scope="session")
def user_headers(minter: TokenMinter) -> dict[str, str]:
    return {"Authorization": f"Bearer {minter.token(roles=('user',), lifetime=3600)}"}


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url, pool_size=2, max_overflow=2)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def rollback_sessions() -> async_sessionmaker[AsyncSession]:
    """Sessions that join the current test's transaction through a SAVEPOINT,
    so the service's commits stay inside it; each test binds it to its connection."""
    return async_sessionmaker(
        expire_on_commit=False, autoflush=False, join_transaction_mode="create_savepoint"
    )


@contextlib.asynccontextmanager
async def app_client(
    settings: Settings, minter: TokenMinter | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on its own engine, with `settings` and `overrides`
    (trusting `minter`'s tokens), its lifespan run for the block."""
    from kit_testing import started

    application = create_app(
        settings.model_copy(update=overrides),
        key_source=None if minter is None else minter.key_source,
    )
    async with (
        started(application) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url=BASE_URL) as http,
    ):
        yield http


def joined_database(sessionmaker: async_sessionmaker[AsyncSession]) -> DatabaseOpener:
    """The app's connections, every one of them inside the session's
    transaction: writes, list reads and get-by-id alike."""

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[AsyncConnection]:
        async with sessionmaker() as session:
            yield await session.connection()

    @contextlib.asynccontextmanager
    async def driver_connection() -> AsyncIterator[Any]:
        async with sessionmaker() as session:
            raw = await (await session.connection()).get_raw_connection()
            yield raw.driver_connection

    async def open_joined(parts: Parts, settings: Settings) -> Database:
        return Database(
            engine=open_unpinged_engine(parts, settings),
            sessionmaker=sessionmaker,
            reads=connection,
            driver_connections=driver_connection,
            # the test's one connection takes one statement at a time
            point_concurrency=1,
        )

    return open_joined


@pytest.fixture(scope="session")
async def app(
    settings: Settings,
    minter: TokenMinter,
    rollback_sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[FastAPI]:
    application = create_app(
        settings, key_source=minter.key_source, database=joined_database(rollback_sessions)
    )
    from kit_testing import started

    async with started(application) as manager:
        application.state.asgi = manager.app
        yield application


@pytest.fixture
async def connection(
    engine: AsyncEngine, rollback_sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncConnection]:
    """One connection and transaction per test, rolled back at its end."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        rollback_sessions.configure(bind=connection)
        try:
            yield connection
        finally:
            rollback_sessions.configure(bind=None)
            await transaction.rollback()


@pytest.fixture
async def client(app: FastAPI, connection: AsyncConnection) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app.state.asgi), base_url=BASE_URL
    ) as http:
        yield http


@pytest.fixture
async def session(
    rollback_sessions: async_sessionmaker[AsyncSession], connection: AsyncConnection
) -> AsyncIterator[AsyncSession]:
    async with rollback_sessions() as session:
        yield session


@pytest.fixture(scope="session")
async def committed_app(settings: Settings, minter: TokenMinter) -> AsyncIterator[FastAPI]:
    """The app on its own engine: commits are real, for tests of concurrency."""
    application = create_app(settings, key_source=minter.key_source)
    from kit_testing import started

    async with started(application) as manager:
        application.state.asgi = manager.app
        yield application


@pytest.fixture
async def committed_client(committed_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(committed_app.state.asgi), base_url=BASE_URL
    ) as http:
        yield http
