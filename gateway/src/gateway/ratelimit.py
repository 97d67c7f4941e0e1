"""Rate limits: a fixed window per client address (an IPv6 one by its /64,
`kit.addresses`) or per user, counted in Redis.

Counts are sent to Redis in batches, and one at a time near a limit. A client
far from its limit (its count, as this process knows it, below half the
limit) is counted in this process's memory and admitted at once; every
`sync_seconds` the counts kept go to Redis in one pipelined round trip (one
`INCRBY` + `EXPIREAT` script a client), whose answers bring each client's
count across every gateway process. Past half its limit, or once this
process holds `1 / UNSENT_SHARE` of its limit unsent, a client's request is
counted in Redis before it is admitted, with whatever was kept, and refused
on that exact count. So refusals are exact, and a client gets at most
`limit / UNSENT_SHARE` more than its limit per gateway process, in the
moment between another process's counts and this one's. `sync_seconds=0`
counts every request in Redis before it is admitted.

While Redis cannot answer, each process counts in its own memory instead
(same limits, same windows): limiting goes on, per process, rather than
letting everything through or refusing everything. Redis is then left alone
for a while (backing off up to 8 s), so an outage does not add a connect
timeout to every request, and taken back as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.metrics import GatewayMetrics
from kit.addresses import limit_key
from kit.errors import RateLimited
from kit.pools import RedisBackoff

logger = logging.getLogger("gateway.ratelimit")

# ARGV: the window's end (the key's expiry), the requests to add
_COUNT_HITS = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then redis.call('EXPIREAT', KEYS[1], ARGV[1]) end
return count
"""
SYNC_SECONDS = 0.05
"""How long a process keeps the counts of clients far from their limits."""
UNSENT_SHARE = 20
"""A process keeps at most a client's limit / UNSENT_SHARE requests unsent."""
# While Redis fails, it is tried again after 1 s, then 2, 4 and 8 s at most:
# each try costs a connection attempt and a lookup of its name.
REDIS_BACKOFF_SECONDS = (1.0, 8.0)
# Identities the local counters hold in one window; the least recently seen go
# first, so memory stays bounded whatever the number of client addresses.
LOCAL_MAX_IDENTITIES = 100_000
# Clients whose counts a process knows while Redis answers (about 220 bytes
# each); one dropped starts again from its next sync's answer.
KNOWN_MAX_IDENTITIES = 20_000


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


class _Tally:
    """One client's count in this window, as this process knows it."""

    __slots__ = ("sending", "shared", "unsent")

    def __init__(self) -> None:
        self.shared = 0
        """The count in Redis at its last answer: every process's requests sent by then."""
        self.unsent = 0
        """Requests admitted here and not sent yet."""
        self.sending = 0
        """Requests on their way to Redis, not answered yet."""

    @property
    def count(self) -> int:
        return self.shared + self.unsent + self.sending


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        *,
        anonymous_limit: int,
        user_limit: int,
        window_seconds: int,
        metrics: GatewayMetrics,
        sync_seconds: float = SYNC_SECONDS,
        local: LocalWindows | None = None,
        max_identities: int = KNOWN_MAX_IDENTITIES,
    ) -> None:
        self.anonymous_limit = anonymous_limit
        self.user_limit = user_limit
        self.window_seconds = window_seconds
        self.metrics = metrics
        self.sync_seconds = sync_seconds
        self.local = local or LocalWindows()
        self.max_identities = max_identities
        self._client = redis
        self._count_hits = redis.register_script(_COUNT_HITS)
        first, cap = REDIS_BACKOFF_SECONDS
        self._redis = RedisBackoff(first=first, cap=cap)
        self._window = -1
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()
        self._unsent: dict[str, _Tally] = {}  # the tallies with requests to send
        self._sync_due: asyncio.TimerHandle | None = None
        self._syncs: set[asyncio.Task[None]] = set()

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
        count = await self._count(identity, limit, window, window_end)
        quota = Quota(limit, max(0, limit - count), reset_seconds)
        if count > limit:
            self.metrics.rate_limited.labels(client).inc()
            refusal = RateLimited(
                f"More than {limit} requests in {self.window_seconds} s", retry_after=reset_seconds
            )
            refusal.headers.update({k.decode(): v.decode() for k, v in quota.headers()})
            raise refusal
        return quota

    async def _count(self, identity: str, limit: int, window: int, window_end: int) -> int:
        if self._redis.usable():
            tally = self._tally(identity, window)
            if self._keeps(tally, limit):
                tally.unsent += 1
                self._unsent[identity] = tally
                self._sync_soon()
                return tally.count
            # sent now, with what was kept: refused only on Redis's own count
            amount, tally.unsent = tally.unsent + 1, 0
            tally.sending += amount
            try:
                count = int(
                    await self._count_hits(
                        keys=[rate_limit_key(identity, window)], args=[window_end + 1, amount]
                    )
                )
            except (RedisError, OSError) as error:
                tally.sending -= amount
                self._redis_failed(error)
            else:
                tally.sending -= amount
                tally.shared = max(tally.shared, count)
                self._redis_answered()
                return count
        self.metrics.rate_limit_local.inc()
        return self.local.hit(identity, window)

    def _keeps(self, tally: _Tally, limit: int) -> bool:
        """Whether this request may be counted here and sent later: far from
        the limit, with less than this process's share of it unsent."""
        return (
            self.sync_seconds > 0
            and tally.unsent + tally.sending < limit // UNSENT_SHARE
            and tally.count < limit // 2
        )

    def _tally(self, identity: str, window: int) -> _Tally:
        if window != self._window:
            # the window's end ends its counts, the unsent ones with it
            self._window = window
            self._tallies.clear()
            self._unsent.clear()
        tally = self._tallies.get(identity)
        if tally is not None:
            self._tallies.move_to_end(identity)
            return tally
        tally = self._tallies[identity] = _Tally()
        if len(self._tallies) > self.max_identities:
            self._tallies.popitem(last=False)
        return tally

    def _sync_soon(self) -> None:
        if self._sync_due is None:
            # in a context of its own: the sync carries many requests' counts,
            # so it belongs to no request's trace or log lines (kit.tracing
            # traces no Redis call outside a request)
            self._sync_due = asyncio.get_running_loop().call_later(
                self.sync_seconds, self._start_sync, context=contextvars.Context()
            )

    def _start_sync(self) -> None:
        self._sync_due = None
        task = asyncio.create_task(self.sync())
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)

    async def sync(self) -> None:
        """Sends every count kept here to Redis, in one round trip."""
        if not self._redis.usable():
            return  # kept for the first sync once Redis is asked again
        window = self._window
        unsent, self._unsent = self._unsent, {}
        # a client dropped from the known ones still has its count sent; one
        # sent in full by a request near its limit has none left
        kept = [
            (identity, tally, tally.unsent) for identity, tally in unsent.items() if tally.unsent
        ]
        if not kept:
            return
        for _, tally, amount in kept:
            tally.unsent = 0
            tally.sending += amount
        expiry = (window + 1) * self.window_seconds + 1
        try:
            # EVAL, not EVALSHA: the pipeline goes out in one write, with no
            # round trip first to see whether Redis has the script
            async with self._client.pipeline(transaction=False) as pipe:
                for identity, _, amount in kept:
                    pipe.eval(_COUNT_HITS, 1, rate_limit_key(identity, window), expiry, amount)
                counts = await pipe.execute()
        except (RedisError, OSError) as error:
            # Kept for the first sync once Redis answers again (in this window);
            # requests meanwhile are counted per process. Not after a timeout:
            # Redis may have run the counts, and they would count twice.
            timed_out = isinstance(error, RedisTimeout | TimeoutError)
            for identity, tally, amount in kept:
                tally.sending -= amount
                if not timed_out and self._window == window:
                    tally.unsent += amount
                    self._unsent[identity] = tally
            self._redis_failed(error)
            return
        for (_, tally, amount), count in zip(kept, counts, strict=True):
            tally.sending -= amount
            tally.shared = max(tally.shared, int(count))
        self._redis_answered()

    def _redis_failed(self, error: Exception) -> None:
        if self._redis.failed():
            logger.warning("rate limiting cannot reach Redis (%s); counting per process", error)

    def _redis_answered(self) -> None:
        if self._redis.answered():
            logger.info("rate limiting counts in Redis again")

    async def close(self) -> None:
        """Sends what is kept and stops syncing (the gateway's stop)."""
        if self._sync_due is not None:
            self._sync_due.cancel()
            self._sync_due = None
        await asyncio.gather(*self._syncs, return_exceptions=True)
        await self.sync()
