from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import RedisDsn
from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from kit.app import assemble
from kit.db import make_engine
from kit.lifespan import Parts, open_redis
from kit.pools import REDIS_DRIVER, RedisBackoff
from kit.settings import ServiceSettings
from kit_testing import started


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


@pytest.fixture
async def scraped(
    postgres_server_url: str, redis_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine, Redis]]:
    engine = make_engine(f"{postgres_server_url}/test", pool_size=1, max_overflow=0)
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=3)
    redis = Redis(connection_pool=pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"engine": engine, "redis": redis, "settings": ServiceSettings()}

    app = FastAPI(lifespan=lifespan)
    assemble(app, ServiceSettings(_env_file=None), readiness={})
    try:
        async with started(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client, engine, redis
    finally:
        await redis.aclose()
        await pool.aclose()
        await engine.dispose()


async def test_metrics_show_pool_use_waiters_and_wait_times(
    scraped: tuple[httpx.AsyncClient, AsyncEngine, Redis],
) -> None:
    client, engine, redis = scraped
    await redis.ping()
    async with engine.connect() as held:
        await held.execute(text("SELECT 1"))

        async def second() -> None:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))

        waiter = asyncio.create_task(second())
        async with asyncio.timeout(10):
            while True:  # until the second checkout queues behind the held one
                scraped_now = samples((await client.get("/metrics")).text)
                if scraped_now[("db_pool_waiting", frozenset({("pool", "engine")}))] == 1:
                    break
                await asyncio.sleep(0.01)
    await waiter
    assert (
        scraped_now[("db_pool_connections", frozenset({("pool", "engine"), ("state", "in_use")}))]
        == 1
    )
    assert scraped_now[("db_pool_max_connections", frozenset({("pool", "engine")}))] == 1
    assert scraped_now[("redis_pool_max_connections", frozenset({("pool", "redis")}))] == 3
    assert (
        scraped_now[("redis_pool_connections", frozenset({("pool", "redis"), ("state", "idle")}))]
        == 1
    )
    after = samples((await client.get("/metrics")).text)
    checkouts = after[("db_pool_wait_seconds_count", frozenset({("pool", "engine")}))]
    assert checkouts >= 2
    assert after[("db_pool_waiting", frozenset({("pool", "engine")}))] == 0


async def test_metrics_include_the_process_and_requests_in_flight(
    scraped: tuple[httpx.AsyncClient, AsyncEngine, Redis],
) -> None:
    client, _, _ = scraped
    names = {name for name, _ in samples((await client.get("/metrics")).text)}
    for expected in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_collections_total",
        "python_info",
        "http_requests_in_flight",
    ):
        assert expected in names


async def test_new_redis_connections_share_one_driver_info(redis_url: str) -> None:
    """Each connection a pool opens takes the one `REDIS_DRIVER` instead of
    building its own (which reads redis-py's version from the installed
    distributions every time), and works as before."""
    async with contextlib.AsyncExitStack() as stack:
        settings = ServiceSettings(_env_file=None, redis_url=RedisDsn(redis_url))
        client = open_redis(Parts(stack), settings)
        pool = client.connection_pool
        first = pool.make_connection()  # type: ignore[no-untyped-call]
        second = pool.make_connection()  # type: ignore[no-untyped-call]
        assert first.driver_info is second.driver_info is REDIS_DRIVER
        assert await client.ping()
        await first.disconnect()
        await second.disconnect()


async def test_a_connection_redis_closed_costs_a_reconnect_not_an_error(redis_url: str) -> None:
    """A pooled connection Redis has closed (here by `CLIENT KILL`, as a
    restart or its idle timeout would) fails the next command sent on it; the
    command goes again on a fresh connection instead of failing the caller."""
    async with contextlib.AsyncExitStack() as stack:
        settings = ServiceSettings(_env_file=None, redis_url=RedisDsn(redis_url))
        client = open_redis(Parts(stack), settings)
        key = f"reconnect-{uuid.uuid4().hex}"
        killed = await client.client_id()  # the one pooled connection
        async with Redis.from_url(redis_url) as killer:
            assert await killer.client_kill_filter(_id=str(killed)) == 1
        assert await client.incr(key) == 1  # sent once: counted once
        assert await client.client_id() != killed
        await client.delete(key)


class Clock:
    """A `time.monotonic` the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_redis_is_asked_again_after_a_backoff_that_doubles_up_to_its_cap() -> None:
    clock = Clock()
    backoff = RedisBackoff(first=1.0, cap=4.0, clock=clock)
    assert backoff.usable()
    assert backoff.answered() is False  # no run of failures to end

    waits = []
    for _ in range(4):
        first_of_run = backoff.failed()
        waited = 0.0
        while not backoff.usable():
            clock.now += 0.25
            waited += 0.25
        waits.append((first_of_run, waited))
    assert waits == [(True, 1.0), (False, 2.0), (False, 4.0), (False, 4.0)]
    assert backoff.since == 100.0  # the run's first failure

    assert backoff.answered() is True  # the end of the run, to log once
    assert backoff.usable()
    assert backoff.answered() is False
    backoff.failed()
    clock.now += 1.0
    assert backoff.usable()  # a new run starts from `first` again
