"""Rate limits: a fixed window per client address (an IPv6 one by its /64,
`kit.addresses`) or per user, counted in Redis.

One EVALSHA per request counts the hit and sets the window's expiry, so every
gateway process shares one count. While Redis cannot answer, each process
counts in its own memory instead (same limits, same windows): limiting goes
on, per process, rather than letting everything through or refusing
everything. Redis is then left alone for a while (backing off up to 8 s), so
an outage does not add a connect timeout to every request, and taken back as
soon as it answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from kit.addresses import limit_key
from kit.errors import RateLimited
from kit.pools import RedisBackoff

logger = logging.getLogger("gateway.ratelimit")

_COUNT_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIREAT', KEYS[1], ARGV[1]) end
return count
"""
# While Redis fails, it is tried again after 1 s, then 2, 4 and 8 s at most:
# each try costs a connection attempt and a lookup of its name.
REDIS_BACKOFF_SECONDS = (1.0, 8.0)
# Identities the local counters hold in one window; the least recently seen go
# first, so memory stays bounded whatever the number of client addresses.
LOCAL_MAX_IDENTITIES = 100_000


def rate_limit_key(identity: str, window: int) -> str:
    return f"gateway:ratelimit:{identity}:{window}"


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_seconds).encode()),
        ]


class LocalWindows:
    """Fixed-window counters in this process's memory, for while Redis is away."""

    def __init__(self, *, max_identities: int = LOCAL_MAX_IDENTITIES) -> None:
        self.max_identities = max_identities
        self._window = -1
        self._counts: OrderedDict[str, int] = OrderedDict()

    def hit(self, identity: str, window: int) -> int:
        """Counts one request of `identity` in `window`; returns its count so far."""
        if window != self._window:
            self._window = window
            self._counts.clear()
        count = self._counts.pop(identity, 0) + 1
        self._counts[identity] = count
        if len(self._counts) > self.max_identities:
            self._counts.popitem(last=False)
        return count

    def __len__(self) -> int:
        return len(self._counts)


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        *,
        anonymous_limit: int,
        user_limit: int,
        window_seconds: int,
        metrics: GatewayMetrics,
        local: LocalWindows | None = None,
    ) -> None:
        self.anonymous_limit = anonymous_limit
        self.user_limit = user_limit
        self.window_seconds = window_seconds
        self.metrics = metrics
        self.local = local or LocalWindows()
        self._count_hit = redis.register_script(_COUNT_HIT)
        first, cap = REDIS_BACKOFF_SECONDS
        self._redis = RedisBackoff(first=first, cap=cap)

    @property
    def counting_locally(self) -> bool:
        """Whether the last requests were counted in this process (Redis away)."""
        return self._redis.since is not None

    def describe(self) -> str:
        """One line for `/readyz`."""
        since = self._redis.since
        if since is None:
            return "ok"
        away = time.monotonic() - since
        return f"Redis unreachable for {away:.0f} s: counted per gateway process"

    async def hit(self, *, user_id: str | None, client_address: str) -> Quota:
        """Counts one request; raises RateLimited past the limit."""
        if user_id is not None:
            identity, limit, client = f"user:{user_id}", self.user_limit, "user"
        else:
            identity = f"ip:{limit_key(client_address)}"  # an IPv6 client by its /64
            limit, client = self.anonymous_limit, "anonymous"
        now = time.time()
        window = int(now // self.window_seconds)
        window_end = (window + 1) * self.window_seconds
        reset_seconds = max(1, math.ceil(window_end - now))
        count = await self._count(identity, window, window_end)
        quota = Quota(limit, max(0, limit - count), reset_seconds)
        if count > limit:
            self.metrics.rate_limited.labels(client).inc()
            refusal = RateLimited(
                f"More than {limit} requests in {self.window_seconds} s", retry_after=reset_seconds
            )
            refusal.headers.update({k.decode(): v.decode() for k, v in quota.headers()})
            raise refusal
        return quota

    async def _count(self, identity: str, window: int, window_end: int) -> int:
        if self._redis.usable():
            try:
                count = int(
                    await self._count_hit(
                        keys=[rate_limit_key(identity, window)], args=[window_end + 1]
                    )
                )
            except (RedisError, OSError) as error:
                if self._redis.failed():
                    logger.warning(
                        "rate limiting cannot reach Redis (%s); counting per process", error
                    )
            else:
                if self._redis.answered():
                    logger.info("rate limiting counts in Redis again")
                return count
        self.metrics.rate_limit_local.inc()
        return self.local.hit(identity, window)
