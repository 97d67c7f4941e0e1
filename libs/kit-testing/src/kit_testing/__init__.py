"""Test helpers every service's suite uses: real PostgreSQL and Redis from
Testcontainers (images from POSTGRES_IMAGE / REDIS_IMAGE), Alembic against a
test database, and uvicorn on a loopback port for tests that need a real
socket (WebSockets, the gateway's upstreams).

Load it with `pytest_plugins = ["kit_testing"]` in a conftest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.policy
import json
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send
from testcontainers.core.container import DockerContainer

from kit.settings import DEFAULT_JWT_ISSUER

POSTGRES_IMAGE = os.environ.get("POSTGRES_IMAGE", "postgres:17")
REDIS_IMAGE = os.environ.get("REDIS_IMAGE", "redis:7")
STARTUP_TIMEOUT_SECONDS = 60.0
APP_TIMEOUT_SECONDS = 60.0


def started(app: Any) -> LifespanManager:
    """`app` with its lifespan run, for httpx's ASGITransport (`manager.app`):
    opening and closing may take as long as a busy machine needs, not the 5 s
    asgi-lifespan allows by default."""
    return LifespanManager(
        app, startup_timeout=APP_TIMEOUT_SECONDS, shutdown_timeout=APP_TIMEOUT_SECONDS
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Service:
    """A started container with a fixed host port, so it keeps it across restarts."""

    container: DockerContainer
    port: int

    def restart(self) -> None:
        self.container.get_wrapped_container().restart(timeout=5)

    def stop(self) -> None:
        self.container.get_wrapped_container().stop(timeout=5)

    def start(self) -> None:
        self.container.get_wrapped_container().start()

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """The server frozen for the block (`docker pause`): its port still
        takes connections, and nothing on them is ever answered, as with a
        database cut off by the network or stuck."""
        container = self.container.get_wrapped_container()
        await asyncio.to_thread(container.pause)
        try:
            yield
        finally:
            await asyncio.to_thread(container.unpause)


async def wait_for_postgres(url: str, within: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            connection = await asyncpg.connect(url, timeout=2)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            await connection.close()
            return


async def wait_for_redis(url: str, within: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + within
    client = Redis.from_url(url)
    try:
        while True:
            try:
                await client.ping()
                return
            except (OSError, RedisError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await client.aclose()


@contextlib.contextmanager
def postgres_container(user: str, *settings: str) -> Iterator[Service]:
    """A throwaway PostgreSQL server, answering; `user` is also its password and
    database. Durability is off (nothing in it must survive); `settings` are
    more `-c name=value` server settings."""
    port = free_port()
    options = " ".join(
        f"-c {setting}" for setting in ("fsync=off", "synchronous_commit=off", *settings)
    )
    container = (
        DockerContainer(POSTGRES_IMAGE)
        .with_env("POSTGRES_USER", user)
        .with_env("POSTGRES_PASSWORD", user)
        .with_env("POSTGRES_DB", user)
        .with_bind_ports(5432, port)
        .with_command(f"postgres {options}")
    )
    container.start()
    try:
        asyncio.run(wait_for_postgres(f"postgresql://{user}:{user}@127.0.0.1:{port}/{user}"))
        yield Service(container, port)
    finally:
        container.stop()


@contextlib.contextmanager
def redis_container() -> Iterator[Service]:
    """A throwaway Redis server, answering."""
    port = free_port()
    container = DockerContainer(REDIS_IMAGE).with_bind_ports(6379, port)
    container.start()
    try:
        asyncio.run(wait_for_redis(f"redis://127.0.0.1:{port}/0"))
        yield Service(container, port)
    finally:
        container.stop()


@pytest.fixture(scope="session")
def postgres_service() -> Iterator[Service]:
    with postgres_container("test", "max_connections=300") as service:
        yield service


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Service]:
    with redis_container() as service:
        yield service


@pytest.fixture(scope="session")
def postgres_server_url(postgres_service: Service) -> str:
    """`postgresql+asyncpg://` URL of the server, without a database name."""
    return f"postgresql+asyncpg://test:test@127.0.0.1:{postgres_service.port}"


@pytest.fixture(scope="session")
def redis_url(redis_service: Service) -> str:
    return f"redis://127.0.0.1:{redis_service.port}/0"


def unique_database_url(server_url: str, prefix: str) -> str:
    return f"{server_url}/{prefix}_{uuid.uuid4().hex[:8]}"


def alembic_config(service_dir: Path, url: str) -> object:
    from alembic.config import Config

    config = Config(str(service_dir / "alembic.ini"))
    config.set_main_option("script_location", str(service_dir / "migrations"))
    config.attributes["url"] = url
    return config


def script_revisions(service_dir: Path) -> tuple[str, ...]:
    """A service's Alembic revisions as its migrations/versions hold them, oldest first."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(service_dir, "unused"))  # type: ignore[arg-type]
    return tuple(reversed([script.revision for script in scripts.walk_revisions()]))


async def migrate(service_dir: Path, url: str, revision: str = "head") -> None:
    """`alembic upgrade` in a worker thread: env.py runs its own event loop."""
    from alembic import command

    config = alembic_config(service_dir, url)
    await asyncio.to_thread(command.upgrade, config, revision)  # type: ignore[arg-type]


async def migrated_database(server_url: str, service_dir: Path) -> str:
    """A new database on the server, named after the service, at its head revision."""
    url = unique_database_url(server_url, service_dir.name)
    await migrate(service_dir, url)
    return url


async def downgrade(service_dir: Path, url: str, revision: str = "base") -> None:
    from alembic import command

    config = alembic_config(service_dir, url)
    await asyncio.to_thread(command.downgrade, config, revision)  # type: ignore[arg-type]


def websocket_upgrade(path: str, host: str, *, headers: dict[str, str] | None = None) -> bytes:
    """A WebSocket upgrade request as raw bytes (a fresh key each time), for
    tests that drive a socket by hand: a peer that reads nothing, one that
    never answers pings."""
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    port: int | None = None,
    stop_seconds: float = 30.0,
    **uvicorn_options: Any,
) -> AsyncIterator[str]:
    """Runs `app` under uvicorn on 127.0.0.1 in this event loop; yields its base URL.

    `uvicorn_options` go to `uvicorn.Config` (e.g. `ws_ping_interval=0.2`).
    WebSockets are served by `kit.websocket.WebSocketProtocol`, as every image does.

    uvicorn waits, unbounded, for every connection to close as it stops; one
    whose peer stopped reading never does, since its transport closes only
    once its buffer is written. So a server still stopping `stop_seconds`
    after it was asked to is an AssertionError (chained to whatever the test
    raised), not a run that hangs."""
    from kit.websocket import WebSocketProtocol

    port = port or free_port()
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "on",
        "ws_ping_interval": None,
        "ws": WebSocketProtocol,
    }
    options.update(uvicorn_options)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await _stopped(server, task, stop_seconds)


async def _stopped(server: uvicorn.Server, task: asyncio.Task[None], within: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), within)
    except TimeoutError as error:
        left_open = len(server.server_state.connections)
        server.force_exit = True  # stops waiting on them; the lifespan then ends
        await task
        raise AssertionError(
            f"the server had not stopped {within:g} s after it was asked to: "
            f"{left_open} connection(s) still open"
        ) from error


class TokenMinter:
    """Signs access tokens the way auth does, with a throwaway ES256 key.

    Services' tests pass `minter.key_source` to `create_app` and mint tokens
    for any user and role without running auth.
    """

    def __init__(self, *, issuer: str = DEFAULT_JWT_ISSUER, audience: str = "bazaar") -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from jose import jwk

        from kit.security import StaticKeySource, VerificationKey

        private = ec.generate_private_key(ec.SECP256R1())
        self.private_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public_pem = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        self.kid = uuid.uuid4().hex
        self.issuer = issuer
        self.audience = audience
        public_jwk = jwk.construct(self.public_pem, "ES256").to_dict()
        self.jwks = {"keys": [{**public_jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]}
        self.key_source = StaticKeySource(
            {self.kid: VerificationKey(self.kid, "ES256", jwk.construct(self.public_pem, "ES256"))}
        )

    def token(
        self,
        *,
        user_id: str | None = None,
        name: str = "Test User",
        roles: tuple[str, ...] = ("user",),
        lifetime: int = 900,
        **overrides: object,
    ) -> str:
        from jose import jwt

        now = int(time.time())
        claims: dict[str, object] = {
            "sub": user_id or str(uuid.uuid4()),
            "name": name,
            "roles": list(roles),
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            "iss": self.issuer,
            "aud": self.audience,
            "typ": "access",
        }
        claims.update(overrides)
        encoded: str = jwt.encode(
            claims, self.private_pem, algorithm="ES256", headers={"kid": self.kid}
        )
        return encoded


class JwksServer:
    """auth's JWKS endpoint as verifiers see it, an ASGI app for `serve(server, lifespan="off")`:
    a document tests can change, its Cache-Control, a count of fetches, and a
    switch that makes it answer 503 as an auth replica that lost its database does."""

    def __init__(self, document: dict[str, Any], *, cache_control: str = "max-age=60") -> None:
        self.document = document
        self.cache_control = cache_control
        self.failing = False
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.hits += 1
        status, body = (503, b"{}") if self.failing else (200, json.dumps(self.document).encode())
        headers = [(b"content-type", b"application/json")]
        if not self.failing:
            headers.append((b"cache-control", self.cache_control.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class MailCatcher:
    """A real SMTP server (aiosmtpd, in a thread of its own) that keeps every
    message it accepts, for tests of what a service emails."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        from aiosmtpd.controller import Controller

        self.host = host
        self.port = port or free_port()
        self.messages: list[EmailMessage] = []
        self._controller = Controller(_Keeper(self.messages), hostname=host, port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def to(self, address: str) -> list[EmailMessage]:
        return [message for message in list(self.messages) if message["To"] == address]

    async def wait_for(
        self, address: str, *, count: int = 1, within: float = 20.0
    ) -> list[EmailMessage]:
        """The first `count` messages to `address`, once they have all arrived."""
        deadline = time.monotonic() + within
        while len(received := self.to(address)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(received)} of {count} emails to {address} arrived")
            await asyncio.sleep(0.02)
        return received[:count]


class _Keeper:
    def __init__(self, messages: list[EmailMessage]) -> None:
        self.messages = messages

    # aiosmtpd calls its hooks by these names
    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        parsed = message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 Message accepted"


def emailed_token(message: EmailMessage) -> str:
    """The token an email carries: after `token=` in a link, or alone on its line."""
    body = message.get_content()
    found = re.search(r"token=([A-Za-z0-9_-]+)", body) or re.search(
        r"^([A-Za-z0-9_-]{40,})\r?$", body, re.MULTILINE
    )
    if found is None:
        raise AssertionError(f"no token in: {body}")
    return found.group(1)


@dataclass
class MigrationRoundTrip:
    """What a database looked like after `upgrade head`, `downgrade base`, `upgrade head`."""

    tables_at_base: set[str]
    tables_at_head: set[str]
    indexes_at_head: dict[str, set[str]]
    pending_changes: list[object]


async def migration_round_trip(service_dir: Path, url: str, metadata: Any) -> MigrationRoundTrip:
    """Runs a service's migrations up, down and up again, then compares the
    schema they made with the models (`metadata`): an empty `pending_changes`
    means autogenerate would find nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import create_async_engine

    def tables(connection: Connection) -> set[str]:
        return set(inspect(connection).get_table_names())

    def indexes(connection: Connection) -> dict[str, set[str]]:
        inspector = inspect(connection)
        return {
            table: {str(index["name"]) for index in inspector.get_indexes(table)}
            for table in inspector.get_table_names()
        }

    def pending(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    await migrate(service_dir, url)
    await downgrade(service_dir, url, "base")
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            at_base = await connection.run_sync(tables)
        await migrate(service_dir, url)
        async with engine.connect() as connection:
            return MigrationRoundTrip(
                tables_at_base=at_base,
                tables_at_head=await connection.run_sync(tables),
                indexes_at_head=await connection.run_sync(indexes),
                pending_changes=await connection.run_sync(pending),
            )
    finally:
        await engine.dispose()
