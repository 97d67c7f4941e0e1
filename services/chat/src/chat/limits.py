"""Limits per user, not per socket, shared by every replica through Redis.

- Send rate: every frame a user sends, from any socket on any replica, draws
  on one allowance in Redis (GCRA: one key per user holding the theoretical
  arrival time), `SEND_BURST` at once and `SEND_RATE_PER_SECOND` after that.
  A refusal names when the next frame will be taken; until then the process
  refuses the user's frames itself, without asking Redis again.
- Sockets: a user holds at most `MAX_SOCKETS_PER_USER` at once, across
  replicas. Each process counts its own sockets per user and writes that
  count into the user's hash in Redis (field: the process); a script adds up
  the fields of live processes before admitting one more. A process is live
  while its heartbeat keeps its score in `chat:limits:processes` ahead of the
  clock, so the sockets of a replica that died stop counting
  `PRESENCE_TTL_SECONDS` after its last heartbeat. Redis work grows with
  sockets opened and closed, not with sockets held.

Redis unreachable or frozen: each replica enforces both limits on its own
(the rate per user with a local allowance, the sockets with its own count),
so chat keeps serving; frames and sockets stop asking Redis after the first
failure, until the heartbeat hears it again, which then rewrites the counts
written meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kit.pools import RedisBackoff

logger = logging.getLogger("chat.limits")

PROCESSES_KEY = "chat:limits:processes"
CLOSE_TOO_MANY_SOCKETS = 4029
"""Close code for a socket over the user's limit: accepted, then closed at once."""
# How long a socket's frame waits on Redis, for the limits' checks here and
# for a publish (the publishing pool's socket timeout, chat.main). Long enough
# that a busy machine is not taken for an outage (each replica alone would
# then admit more), short enough that a frozen Redis holds up a socket's
# frames for one moment
REDIS_TIMEOUT_SECONDS = 2.0
REDIS_AWAY_SECONDS = 30.0
"""After a failure, how long frames and sockets are counted here alone unless
the heartbeat hears Redis again first: a frozen Redis (a partition, a server
stuck in a long command) holds up one frame, not one every few seconds."""
SOCKET_COUNTS_TTL_SECONDS = 24 * 3600


def rate_key(user_id: str) -> str:
    return f"chat:limits:rate:{user_id}"


def sockets_key(user_id: str) -> str:
    return f"chat:limits:sockets:{user_id}"


# KEYS[1] the user's rate key; ARGV: ms between frames, ms of burst tolerance.
# Returns 0 when the frame is allowed, else the ms until one will be.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
if tat - tolerance > now then return math.ceil(tat - tolerance - now) end
tat = tat + interval
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1)
return 0
"""

# KEYS: the user's socket counts, the live processes. ARGV: this process, its
# count for the user with the new socket, the limit, the counts' TTL (ms).
# Returns 1 when admitted (and written), 0 when over the limit.
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local total = tonumber(ARGV[2])
local counts = redis.call('HGETALL', KEYS[1])
for i = 1, #counts, 2 do
  local process = counts[i]
  if process ~= ARGV[1] then
    local alive_until = tonumber(redis.call('ZSCORE', KEYS[2], process) or '0')
    if alive_until > now then
      total = total + tonumber(counts[i + 1])
    else
      redis.call('HDEL', KEYS[1], process)
    end
  end
end
if total > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


# KEYS[1] the live processes; ARGV: this process, seconds it stays live.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]) * 1000, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
return 0
"""


class UserLimits:
    """This process's side of the per-user limits."""

    def __init__(
        self,
        *,
        redis: Redis,
        node_id: str,
        rate_per_second: float,
        burst: int,
        max_sockets: int,
        liveness_seconds: float,
    ) -> None:
        self.redis = redis
        # a process of its own: a replica restarted under the same name starts from zero
        self.process = f"{node_id}:{uuid.uuid4().hex[:8]}"
        self.rate_per_second = rate_per_second
        self.burst = burst
        self.max_sockets = max_sockets
        self.liveness_seconds = liveness_seconds
        self.interval_ms = 1000.0 / rate_per_second
        self.tolerance_ms = self.interval_ms * (burst - 1)
        self.sockets: dict[str, int] = {}  # user -> sockets here
        self.unsynced: set[str] = set()  # users whose count here Redis may not have
        self._allowances: dict[str, tuple[float, float]] = {}  # user -> (tokens, at), Redis away
        # user -> until when Redis said no frame will be allowed (monotonic):
        # frames before then are refused here, without asking Redis again
        self._refused_until: dict[str, float] = {}
        self._take = redis.register_script(_TAKE)
        self._open = redis.register_script(_OPEN)
        self._beat = redis.register_script(_BEAT)
        # after a failure: counted here alone until the heartbeat hears Redis
        self._redis = RedisBackoff(first=REDIS_AWAY_SECONDS, cap=REDIS_AWAY_SECONDS)

    # -- send rate ------------------------------------------------------------

    async def take_frame(self, user_id: str) -> float:
        """Draws one frame from the user's allowance: 0 when allowed, else the
        seconds until a frame will be.

        Once refused, the user's frames on this replica are refused here until
        the moment Redis named, without a round trip each: a client that
        ignores `retry_after` and floods costs the Redis every replica shares
        nothing more. (Other replicas' frames of the user can only put that
        moment later, so no frame Redis would take is refused.)"""
        now = time.monotonic()
        refused_until = self._refused_until.get(user_id)
        if refused_until is not None:
            if refused_until > now:
                return refused_until - now
            del self._refused_until[user_id]
        if self._redis_usable():
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                    wait_ms = await self._take(
                        keys=[rate_key(user_id)], args=[self.interval_ms, self.tolerance_ms]
                    )
            except (RedisError, OSError, TimeoutError) as error:
                self._redis_failed(error)
            else:
                wait = int(wait_ms) / 1000
                if wait > 0:
                    if len(self._refused_until) > 100_000:  # long past, most of them
                        self._refused_until.pop(next(iter(self._refused_until)))
                    self._refused_until[user_id] = time.monotonic() + wait
                return wait
        return self._take_locally(user_id)

    def _take_locally(self, user_id: str) -> float:
        now = time.monotonic()
        tokens, at = self._allowances.get(user_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_second)
        if tokens < 1.0:
            self._allowances[user_id] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_second
        self._allowances[user_id] = (tokens - 1.0, now)
        if len(self._allowances) > 100_000:  # users long idle are full again anyway
            self._allowances.pop(next(iter(self._allowances)))
        return 0.0

    # -- sockets --------------------------------------------------------------

    async def open_socket(self, user_id: str) -> bool:
        """Counts a new socket of the user; False (and nothing counted) past the limit."""
        mine = self.sockets.get(user_id, 0) + 1
        self.sockets[user_id] = mine
        admitted = mine <= self.max_sockets
        if admitted and self._redis_usable():
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                    admitted = bool(
                        await self._open(
                            keys=[sockets_key(user_id), PROCESSES_KEY],
                            args=[
                                self.process,
                                mine,
                                self.max_sockets,
                                SOCKET_COUNTS_TTL_SECONDS * 1000,
                            ],
                        )
                    )
            except (RedisError, OSError, TimeoutError) as error:
                self._redis_failed(error)
                self.unsynced.add(user_id)
            else:
                if admitted and self.sockets.get(user_id, 0) != mine:
                    # a socket of the user closed (or opened) here while the
                    # script ran, and its write may have reached Redis first:
                    # write the count as it is now
                    await self._write_count(user_id)
        elif admitted:
            self.unsynced.add(user_id)
        if not admitted:
            self._forget(user_id)
        return admitted

    async def close_socket(self, user_id: str) -> None:
        self._forget(user_id)
        if self._redis_usable():
            await self._write_count(user_id)

    def _forget(self, user_id: str) -> None:
        left = self.sockets.get(user_id, 0) - 1
        if left > 0:
            self.sockets[user_id] = left
        else:
            self.sockets.pop(user_id, None)
        self.unsynced.add(user_id)

    async def _write_count(self, user_id: str) -> None:
        """Writes this process's count for the user as it is now (idempotent).

        Writes of one user's count go on different connections of the pool and
        may reach Redis in another order than they were made; so a write after
        which the count here is not what it wrote is made again (and left to
        the heartbeat after a few tries)."""
        for _ in range(3):
            count = self.sockets.get(user_id, 0)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                    if count:
                        await self.redis.hset(sockets_key(user_id), self.process, count)
                    else:
                        await self.redis.hdel(sockets_key(user_id), self.process)
            except (RedisError, OSError, TimeoutError) as error:
                self._redis_failed(error)
                return
            if self.sockets.get(user_id, 0) == count:
                self.unsynced.discard(user_id)
                return
        self.unsynced.add(user_id)

    # -- liveness ---------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Keeps this process's counts alive and rewrites what Redis missed;
        the one place that finds Redis back after a failure. Raises while
        Redis is away or frozen (the caller logs and goes on)."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._beat(keys=[PROCESSES_KEY], args=[self.process, self.liveness_seconds])
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(error)
            raise
        if self._redis.answered():
            logger.info("per-user limits count in Redis again")
        for user_id in list(self.unsynced):
            await self._write_count(user_id)

    async def leave(self) -> None:
        """This process stops: its counts stop counting at once."""
        try:
            await self.redis.zrem(PROCESSES_KEY, self.process)
        except (RedisError, OSError) as error:
            logger.warning("could not retire this process's socket counts: %s", error)

    def _redis_usable(self) -> bool:
        return self._redis.usable()

    def _redis_failed(self, error: BaseException) -> None:
        if self._redis.failed():
            logger.warning(
                "per-user limits cannot reach Redis (%s); this replica enforces them alone",
                error or type(error).__name__,
            )
