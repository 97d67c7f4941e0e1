"""Start-up, readiness, metrics and the admin bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth import service
from auth.config import Settings
from auth.main import create_app
from auth.models import User
from auth.passwords import Passwords
from kit_testing import Service, TokenMinter, free_port, started

from .conftest import SERVICE_DIR, make_settings, wait_until_ready
from .factories import login, register, unique_email

StartApp = Callable[[Settings], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def client_for() -> AsyncIterator[StartApp]:
    """Yields a function that starts an app with these settings and returns its client."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(settings: Settings) -> httpx.AsyncClient:
            manager = await stack.enter_async_context(started(create_app(settings)))
            return await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(manager.app), base_url="http://auth"
                )
            )

        yield start


async def test_ready_when_database_and_key_are(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "schema": "ok", "bootstrap": "ok"},
        "optional": {"redis": "ok", "revocations": "ok"},
    }


async def test_ready_without_redis_and_what_needs_it_says_retry(database_url: str) -> None:
    """Readiness rests on PostgreSQL; requests that need Redis answer 503 + Retry-After."""
    minter = TokenMinter()
    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings, key_source=minter.key_source)
    async with (
        started(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://auth"
        ) as client,
    ):
        await wait_until_ready(client)
        ready = await client.get("/readyz")
        jwks = await client.get("/auth/.well-known/jwks.json")
        me = await client.get(
            "/auth/users/me", headers={"Authorization": f"Bearer {minter.token()}"}
        )
    assert ready.json()["status"] == "degraded"
    assert ready.json()["optional"]["redis"].startswith("failed")
    assert jwks.status_code == 200
    assert jwks.json()["keys"]
    assert me.status_code == 503
    assert me.json()["detail"] == "Token revocation list is unreachable; retry"
    assert int(me.headers["retry-after"]) >= 1


async def test_starts_and_reports_not_ready_while_the_database_is_down(
    client_for: StartApp, redis_url: str
) -> None:
    unreachable = f"postgresql+asyncpg://nobody:nothing@127.0.0.1:{free_port()}/auth"
    client = await client_for(make_settings(unreachable, redis_url))
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    checks = response.json()["checks"]
    assert response.json()["optional"]["redis"] == "ok"
    assert checks["database"].startswith("failed")
    assert checks["bootstrap"].startswith("failed")
    login = await client.post("/auth/token", data={"username": "a@example.com", "password": "x"})
    assert login.status_code == 503


async def bootstrapped(client: httpx.AsyncClient, *, within: float = 20.0) -> None:
    """Signing key and admin in place (readiness as a whole may still fail)."""
    async with asyncio.timeout(within):
        while True:
            checks = (await client.get("/readyz")).json()["checks"]
            if checks["bootstrap"] == "ok":
                return
            await asyncio.sleep(0.05)


async def test_logins_go_on_with_stricter_limits_while_redis_is_down(
    client_for: StartApp, database_url: str
) -> None:
    settings = make_settings(database_url, f"redis://127.0.0.1:{free_port()}/0")
    client = await client_for(settings)
    await bootstrapped(client)
    admin = await client.post(
        "/auth/token", data={"username": "root@example.com", "password": "admin-password-1"}
    )
    email = unique_email()
    guesses = [
        (await client.post("/auth/token", data={"username": email, "password": "guess 1234"}))
        for _ in range(3)
    ]
    ready = await client.get("/readyz")
    assert admin.status_code == 200
    assert admin.json()["token_type"] == "bearer"
    # this replica alone allows ceil(3 * 0.5) = 2 per account and address
    assert [guess.status_code for guess in guesses] == [400, 400, 429]
    assert guesses[2].headers["content-type"] == "application/problem+json"
    # ready all the same: logins and the rest need PostgreSQL, not Redis
    assert ready.status_code == 200
    assert ready.json()["optional"]["redis"].startswith("failed")


async def test_metrics_need_basic_auth_when_configured(
    client_for: StartApp, database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        database_url, redis_url, metrics_user="prometheus", metrics_password="scrape-secret"
    )
    client = await client_for(settings)
    anonymous = await client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    wrong = await client.get("/metrics", auth=("prometheus", "guess"))
    assert wrong.status_code == 401
    right = await client.get("/metrics", auth=("prometheus", "scrape-secret"))
    assert right.status_code == 200
    assert "http_requests_total" in right.text


async def test_admin_bootstrap_is_idempotent_across_replicas(
    sessionmaker: async_sessionmaker[AsyncSession], database_url: str, redis_url: str
) -> None:
    email = unique_email("boss")
    settings = make_settings(
        database_url, redis_url, admin_email=email, admin_password="boss password"
    )
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1)
    await asyncio.gather(
        *(
            service.ensure_admin(sessionmaker=sessionmaker, passwords=passwords, settings=settings)
            for _ in range(3)
        )
    )
    async with sessionmaker() as session:
        users = (await session.scalars(select(User).where(User.email == email))).all()
    assert len(users) == 1
    assert sorted(users[0].roles) == ["admin", "user"]


async def test_admin_bootstrap_promotes_an_existing_account(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    database_url: str,
    redis_url: str,
) -> None:
    account = await register(client)
    settings = make_settings(
        database_url, redis_url, admin_email=account.email, admin_password="other password"
    )
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1)
    for _ in range(2):
        await service.ensure_admin(
            sessionmaker=sessionmaker, passwords=passwords, settings=settings
        )
    async with sessionmaker() as session:
        user = await session.scalar(select(User).where(User.email == account.email))
    assert user is not None
    assert user.roles == ["user", "admin"]
    # the account keeps its own password, and the log says ADMIN_PASSWORD is not it
    assert await passwords.verify(user.password_hash, account.password)
    assert user.email_verified_at is not None


@pytest.fixture
def service_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """auth.service's records; the apps' logging set-up replaced the root
    handlers, caplog's included, so it listens on the logger itself."""
    logger = logging.getLogger("auth.service")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="auth.service")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def records_about(log: pytest.LogCaptureFixture, email: str) -> list[logging.LogRecord]:
    unique = {id(record): record for record in log.records}.values()
    return [record for record in unique if email in record.getMessage()]


async def test_without_admin_password_the_admin_gets_a_random_one_shown_once(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    database_url: str,
    redis_url: str,
    service_log: pytest.LogCaptureFixture,
) -> None:
    email = unique_email("first-admin")
    settings = make_settings(database_url, redis_url, admin_email=email, admin_password=None)
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1)

    await asyncio.gather(
        *(
            service.ensure_admin(sessionmaker=sessionmaker, passwords=passwords, settings=settings)
            for _ in range(3)
        )
    )
    await service.ensure_admin(sessionmaker=sessionmaker, passwords=passwords, settings=settings)

    shown = [record for record in records_about(service_log, email) if "generated" in record.msg]
    assert len(shown) == 1
    assert shown[0].levelname == "WARNING"
    password = str(shown[0].args[1])  # type: ignore[index]
    assert f"python -m auth.admin set-password {email}" in shown[0].getMessage()
    tokens = await login(client, email, password)
    me = await client.get("/auth/users/me", headers=tokens.headers)
    assert me.json()["roles"] == ["admin", "user"]
    assert me.json()["email_verified"] is True


async def test_a_changed_admin_password_is_reported_not_applied(
    client: httpx.AsyncClient,
    sessionmaker: async_sessionmaker[AsyncSession],
    database_url: str,
    redis_url: str,
    service_log: pytest.LogCaptureFixture,
) -> None:
    email = unique_email("admin")
    passwords = Passwords(memory_cost_kib=64, time_cost=1, parallelism=1)
    for password in ("the first password", "a later password"):
        settings = make_settings(
            database_url, redis_url, admin_email=email, admin_password=password
        )
        await service.ensure_admin(
            sessionmaker=sessionmaker, passwords=passwords, settings=settings
        )

    (warning,) = [r for r in records_about(service_log, email) if r.levelname == "WARNING"]
    assert (
        "ADMIN_PASSWORD is not the password of the existing admin account" in warning.getMessage()
    )
    await login(client, email, "the first password")


async def test_empty_optional_settings_count_as_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SMTP_URL", "ADMIN_EMAIL", "ADMIN_PASSWORD", "SIGNING_KEY", "SIGNING_KEY_FILE"):
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert settings.smtp_url is None
    assert settings.admin_email == "admin@example.com"
    assert settings.admin_password is None
    assert settings.signing_key_pem() is None


async def test_answers_again_after_postgres_restarts(
    client: httpx.AsyncClient, postgres_service: Service
) -> None:
    """Pooled connections die with the server; pre-ping replaces them, and
    meanwhile a request gets 503 problem+json, never a 500."""
    account = await register(client)
    await asyncio.to_thread(postgres_service.restart)
    statuses: list[int] = []
    async with asyncio.timeout(30):
        while True:
            response = await client.post(
                "/auth/token", data={"username": account.email, "password": account.password}
            )
            statuses.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            await asyncio.sleep(0.2)
    me = await client.get(
        "/auth/users/me", headers={"Authorization": f"Bearer {response.json()['access_token']}"}
    )
    assert me.status_code == 200
    assert set(statuses) <= {200, 503}


async def test_not_ready_while_its_schema_is_behind_then_ready_once_migrated(
    client_for: StartApp, postgres_server_url: str, redis_url: str
) -> None:
    """An upgrade's new replicas start before its migrate step has run: they
    must not serve on the old schema, and become ready by themselves after."""
    from kit_testing import migrate, unique_database_url

    url = unique_database_url(postgres_server_url, "auth_behind")
    await migrate(SERVICE_DIR, url, "0002")
    client = await client_for(make_settings(url, redis_url))
    behind = await client.get("/readyz")

    await migrate(SERVICE_DIR, url)
    await wait_until_ready(client, within=30)

    assert behind.status_code == 503
    assert behind.json()["checks"]["schema"] == (
        "failed: RuntimeError: schema at 0002; this code needs 0004"
    )
    assert (await client.get("/readyz")).json()["checks"]["schema"] == "ok"
