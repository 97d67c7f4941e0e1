"""Rate limits in Redis: a fixed window per client address or per user.

One EVALSHA per request counts the hit and sets the window's expiry. When
Redis cannot answer, the policy decides (let through, or refuse with 503),
each such decision is counted, and Redis is left alone for a moment so an
outage does not add a connect timeout to every request.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from kit.errors import RateLimited, ServiceUnavailable

logger = logging.getLogger("gateway.ratelimit")

_COUNT_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIREAT', KEYS[1], ARGV[1]) end
return count
"""
REDIS_BACKOFF_SECONDS = 1.0


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


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        *,
        anonymous_limit: int,
        user_limit: int,
        window_seconds: int,
        fail_open: bool,
        metrics: GatewayMetrics,
    ) -> None:
        self.anonymous_limit = anonymous_limit
        self.user_limit = user_limit
        self.window_seconds = window_seconds
        self.fail_open = fail_open
        self.metrics = metrics
        self._count_hit = redis.register_script(_COUNT_HIT)
        self._redis_down_until = 0.0

    async def hit(self, *, user_id: str | None, client_address: str) -> Quota | None:
        """Counts one request; raises RateLimited past the limit.

        Returns None when Redis is unreachable and the policy is to fail open.
        """
        if user_id is not None:
            identity, limit, client = f"user:{user_id}", self.user_limit, "user"
        else:
            identity, limit, client = f"ip:{client_address}", self.anonymous_limit, "anonymous"
        now = time.time()
        window = int(now // self.window_seconds)
        window_end = (window + 1) * self.window_seconds
        reset_seconds = max(1, math.ceil(window_end - now))
        if time.monotonic() < self._redis_down_until:
            self._redis_unavailable()
            return None
        try:
            count = int(
                await self._count_hit(
                    keys=[rate_limit_key(identity, window)], args=[window_end + 1]
                )
            )
        except (RedisError, OSError) as error:
            logger.warning("rate limiting cannot reach Redis: %s", error)
            self._redis_down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            self._redis_unavailable()
            return None
        quota = Quota(limit, max(0, limit - count), reset_seconds)
        if count > limit:
            self.metrics.rate_limited.labels(client).inc()
            refusal = RateLimited(
                f"More than {limit} requests in {self.window_seconds} s", retry_after=reset_seconds
            )
            refusal.headers.update({k.decode(): v.decode() for k, v in quota.headers()})
            raise refusal
        return quota

    def _redis_unavailable(self) -> None:
        """Applies the fail-open/closed policy: returns (open) or raises (closed)."""
        if self.fail_open:
            self.metrics.rate_limit_unavailable.labels("allowed").inc()
            return
        self.metrics.rate_limit_unavailable.labels("refused").inc()
        raise ServiceUnavailable(
            "Rate limiting is unavailable; retry shortly", headers={"Retry-After": "1"}
        )
