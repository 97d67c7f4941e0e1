"""Connection pool metrics: how full each pool is, who waits for it, how long.

Read at scrape time from the app's lifespan state, so the request path never
touches a gauge:

    db_pool_connections{pool, state="in_use|idle"}   db_pool_max_connections{pool}
    db_pool_waiting{pool}                            tasks waiting for a connection
    redis_pool_connections{pool, state}              redis_pool_max_connections{pool}
    redis_pool_waiting{pool}

`pool` is the state key the pool was found under (`engine` is the SQLAlchemy
pool every service with a database has, `redis` the command pool), so the
series are the same on every service. And one histogram, observed as it happens:

    db_pool_wait_seconds{pool}   time to get a connection, opening one included

The waiting counts read asyncio's queue of waiters in SQLAlchemy's and
redis-py's pools, which neither library exposes otherwise; a library that
renames them shows 0 waiting, never an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Gauge, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError

WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REDIS_DRIVER = DriverInfo()
"""What every Redis client here passes as `driver_info`. Left out, redis-py
builds it again for each connection it opens and reads its own version from
the installed distributions each time: about 0.3 ms of a new connection's
0.31, and pools grow by dozens in a connection storm."""


def redis_reconnects() -> dict[str, Any]:
    """Options for a Redis client on which a pooled connection that Redis
    closed (a restart, its idle timeout, `CLIENT KILL`) costs a reconnect, not
    an error: a command that fails with a connection error is sent once more,
    on a fresh connection. redis-py's asyncio connections retry nothing by
    default. Timeouts are not retried: a command that timed out may have run
    (an INCR counted twice), and a connect that timed out would double every
    call's wait while Redis is down."""
    return {
        "retry": Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            retries=1,
            supported_errors=(RedisConnectionError,),
        ),
        "retry_on_error": [RedisConnectionError],
    }


class RedisBackoff:
    """When a caller that can do without Redis (it counts locally meanwhile)
    asks it again after a failure: not for `first` seconds, then twice as long
    after each failure in a row, up to `cap`; at once after an answer. A
    frozen Redis (each call waits out its timeout) then holds one call per
    interval, not every call, and one that is down is not dialled per call."""

    __slots__ = ("_clock", "_next", "_until", "cap", "first", "since")

    def __init__(
        self, *, first: float, cap: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.first = first
        self.cap = cap
        self._clock = clock
        self.since: float | None = None
        """`time.monotonic()` of the first failure of the current run, None while Redis answers."""
        self._until = 0.0
        self._next = first

    def usable(self) -> bool:
        return self._clock() >= self._until

    def failed(self) -> bool:
        """Notes a failure; True for the first of a run (the one to log)."""
        now = self._clock()
        first = self.since is None
        if first:
            self.since = now
        self._until = now + self._next
        self._next = min(self._next * 2, self.cap)
        return first

    def answered(self) -> bool:
        """Notes an answer; True if it ends a run of failures (the return to log)."""
        ended = self.since is not None
        self.since = None
        self._until = 0.0
        self._next = self.first
        return ended


DB_POOL_WAIT = Histogram(
    "db_pool_wait_seconds",
    "Time to get a database connection from a pool (opening one included)",
    ["pool"],
    buckets=WAIT_BUCKETS,
    registry=None,
)
"""Process-wide (the pools record into it without knowing the app), and
registered in every app's registry by `PoolMetrics`."""


@dataclass(frozen=True, slots=True)
class PoolUsage:
    in_use: int
    idle: int
    max_size: int
    waiting: int


@runtime_checkable
class ReportsPoolUsage(Protocol):
    """A pool of the service's own (catalog's point reads) that reports itself."""

    def pool_usage(self) -> PoolUsage: ...


def _waiters(queue: Any) -> int:
    """Not-yet-woken waiters of an asyncio.Queue or Condition (0 if unknown)."""
    waiters = getattr(queue, "_getters", None) or getattr(queue, "_waiters", None) or ()
    return sum(1 for waiter in waiters if not waiter.done())


def sqlalchemy_usage(engine: Any) -> PoolUsage | None:
    pool = getattr(getattr(engine, "sync_engine", engine), "pool", None)
    if pool is None or not hasattr(pool, "checkedout"):
        return None
    size = pool.size()
    max_overflow = getattr(pool, "_max_overflow", 0)
    queue = getattr(getattr(pool, "_pool", None), "_queue", None)
    return PoolUsage(
        in_use=pool.checkedout(),
        idle=pool.checkedin(),
        max_size=size + max(max_overflow, 0),
        waiting=_waiters(queue),
    )


def redis_usage(redis: Any) -> PoolUsage | None:
    pool = getattr(redis, "connection_pool", None)
    if pool is None or not hasattr(pool, "_in_use_connections"):
        return None
    return PoolUsage(
        in_use=len(pool._in_use_connections),
        idle=len(pool._available_connections),
        max_size=int(pool.max_connections),
        waiting=_waiters(getattr(pool, "_condition", None)),
    )


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.db_connections = Gauge(
            "db_pool_connections",
            "Database connections by pool and state (in_use, idle)",
            ["pool", "state"],
            registry=registry,
        )
        self.db_max = Gauge(
            "db_pool_max_connections", "Most connections a pool opens", ["pool"], registry=registry
        )
        self.db_waiting = Gauge(
            "db_pool_waiting",
            "Tasks waiting for a database connection",
            ["pool"],
            registry=registry,
        )
        self.redis_connections = Gauge(
            "redis_pool_connections",
            "Redis connections by pool and state (in_use, idle)",
            ["pool", "state"],
            registry=registry,
        )
        self.redis_max = Gauge(
            "redis_pool_max_connections",
            "Most connections a Redis pool opens",
            ["pool"],
            registry=registry,
        )
        self.redis_waiting = Gauge(
            "redis_pool_waiting",
            "Tasks waiting for a Redis connection",
            ["pool"],
            registry=registry,
        )
        registry.register(DB_POOL_WAIT)

    def sample(self, state: Any) -> None:
        """Reads every pool in the app's state (a request's `request.state`)."""
        values: Mapping[str, Any] = getattr(state, "_state", {})
        for name, value in values.items():
            kind = type(value).__module__
            if kind.startswith("sqlalchemy") and (usage := sqlalchemy_usage(value)):
                self._set_db(name, usage)
            elif kind.startswith("redis") and (usage := redis_usage(value)):
                self._set_redis(name, usage)
            elif isinstance(value, ReportsPoolUsage):
                self._set_db(name, value.pool_usage())

    def _set_db(self, name: str, usage: PoolUsage) -> None:
        self.db_connections.labels(name, "in_use").set(usage.in_use)
        self.db_connections.labels(name, "idle").set(usage.idle)
        self.db_max.labels(name).set(usage.max_size)
        self.db_waiting.labels(name).set(usage.waiting)

    def _set_redis(self, name: str, usage: PoolUsage) -> None:
        self.redis_connections.labels(name, "in_use").set(usage.in_use)
        self.redis_connections.labels(name, "idle").set(usage.idle)
        self.redis_max.labels(name).set(usage.max_size)
        self.redis_waiting.labels(name).set(usage.waiting)


def observe_wait(pool: str, started: float) -> None:
    DB_POOL_WAIT.labels(pool).observe(time.perf_counter() - started)
