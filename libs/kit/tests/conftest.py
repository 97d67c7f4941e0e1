from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

pytest_plugins = ["kit_testing"]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
