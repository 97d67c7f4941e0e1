"""Annotated dependency aliases, so routes read like prose.

Every dependency is `async def`: FastAPI runs a plain `def` one in a worker
thread, a hop that costs more than the lookup itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from auth.config import Settings
from auth.keys import KeyRing
from auth.passwords import Passwords
from auth.throttle import LoginThrottle
from kit.addresses import limit_key
from kit.batching import BatchedReads
from kit.db import session_dependency


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.state.redis
    return redis


async def get_user_reads(request: Request) -> BatchedReads:
    user_reads: BatchedReads = request.state.user_reads
    return user_reads


async def get_key_ring(request: Request) -> KeyRing:
    key_ring: KeyRing = request.state.key_ring
    return key_ring


async def get_passwords(request: Request) -> Passwords:
    passwords: Passwords = request.state.passwords
    return passwords


async def client_address(request: Request) -> str:
    """The caller's address as per-client throttling counts it (an IPv6 one by
    its /64, `kit.addresses`). Behind the gateway, uvicorn's `--proxy-headers`
    has already put X-Forwarded-For's first address here."""
    return limit_key(request.client.host) if request.client else "unknown"


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(session_dependency)]
RedisDep = Annotated[Redis, Depends(get_redis)]
UserReadsDep = Annotated[BatchedReads, Depends(get_user_reads)]
KeyRingDep = Annotated[KeyRing, Depends(get_key_ring)]
PasswordsDep = Annotated[Passwords, Depends(get_passwords)]
ClientAddress = Annotated[str, Depends(client_address)]


async def get_throttle(request: Request) -> LoginThrottle:
    throttle: LoginThrottle = request.state.throttle
    return throttle


ThrottleDep = Annotated[LoginThrottle, Depends(get_throttle)]
