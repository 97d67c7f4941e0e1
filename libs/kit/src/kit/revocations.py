"""A per-process mirror of the Redis revocation list, kept current by Redis
keyspace notifications, so verifying a token needs no Redis round trip.

Protocol, per connection of the subscriber:

1. make sure Redis publishes keyspace events for strings, generic commands,
   expiry and eviction (`CONFIG SET notify-keyspace-events`, merged with what
   is set already; if Redis refuses, the mirror never becomes current and the
   verifier keeps asking Redis per request);
2. `PSUBSCRIBE __keyspace@<db>__:auth:revoked:*` and wait for the confirmation;
3. rebuild the whole mirror by SCAN (writes made during the scan arrive as
   events after it and are applied in order);
4. apply every event in order (a user's cutoff is read with GET; while that
   read is in flight the mirror is not current) and PING on the subscriber
   connection every `heartbeat_seconds`.

The mirror is *current* only while it is synced, has had a PONG since (so
the events of writes made during the SCAN are applied), has no read in
flight, and the last PONG answered a PING sent less than `lease_seconds` ago. Because
Redis answers a PING after delivering every event it published earlier on
that connection, a current mirror holds every revocation written before that
PING was sent. Whenever it is not current, the caller falls back to asking
Redis: a revocation is therefore seen as soon as its event reaches this
process, and at worst `lease_seconds` after it was written if the subscriber
connection silently stops delivering. When Redis cannot be asked either, the
caller may answer from the mirror as it was at its last sync (`staleness()`)
for a bounded time, then fails closed.

Every write of a revocation key by anyone (auth, an operator's redis-cli)
produces an event, so writers need no publish step; `revoke_token` /
`revoke_user` also apply the write to this process's mirrors at once, before
the writer answers its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

logger = logging.getLogger("kit.revocations")

REVOCATION_PREFIX = "auth:revoked:"
TOKEN_PREFIX = f"{REVOCATION_PREFIX}jti:"
USER_PREFIX = f"{REVOCATION_PREFIX}user:"
# K: keyspace channel; $: SET; g: DEL, EXPIRE, RENAME...; x: expired; e: evicted
_NEEDED_FLAGS = frozenset("K$gxe")
_ALL_FLAG_EXPANSION = "g$lshzxetd"
_GONE_EVENTS = frozenset({"del", "expired", "evicted"})
_IGNORED_EVENTS = frozenset({"expire", "persist"})  # a TTL change does not change presence
_SCAN_BATCH = 1000

_live: weakref.WeakSet[RevocationMirror] = weakref.WeakSet()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cutoff(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf  # an unreadable cutoff refuses every token of that user


def _target(redis: Redis) -> tuple[object, ...]:
    kwargs = redis.connection_pool.connection_kwargs
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db", 0))


class NotificationsUnavailable(Exception):
    """Redis refused to enable keyspace notifications."""


class RevocationMirror:
    def __init__(
        self,
        redis: Redis,
        *,
        heartbeat_seconds: float = 0.25,
        lease_seconds: float = 1.0,
        retry_seconds: tuple[float, float] = (0.05, 2.0),
        unsupported_retry_seconds: float = 30.0,
    ) -> None:
        self.redis = redis
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds
        self.unsupported_retry_seconds = unsupported_retry_seconds
        db = redis.connection_pool.connection_kwargs.get("db", 0)
        self._channel_prefix = f"__keyspace@{db}__:"
        self._tokens: set[str] = set()
        self._users: dict[str, float] = {}
        self._reading = 0
        self._synced = False
        # a PONG has come back since the last resync: every event Redis queued
        # during its SCAN (a write the SCAN went past) has been applied
        self._confirmed = False
        self._heard = -math.inf
        self._pings: deque[float] = deque()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.syncs = 0  # completed full resyncs, for observability and tests
        self._failing = False  # since the last failed attempt, no session synced
        # this process's revocations while a read of Redis is under way (a
        # resync's SCAN, a key's GET): the read may predate them, and what it
        # found must not replace them (see `_journaled`)
        self._journal: list[tuple[str, Any]] | None = None
        self._journal_readers = 0

    # --- the per-request side: no I/O ---------------------------------------------

    @property
    def synced(self) -> bool:
        """Whether the subscriber is connected and has rebuilt the mirror since."""
        return self._synced

    def current(self) -> bool:
        return (
            self._synced
            and self._confirmed
            and not self._reading
            and time.monotonic() - self._heard < self.lease_seconds
        )

    @property
    def failing(self) -> bool:
        """Whether its last attempt to reach Redis failed and none has synced since:
        Redis is down or out of reach, and this subscriber keeps trying."""
        return self._failing

    def staleness(self) -> float:
        """Seconds since the mirror last provably held every revocation written
        (the sending of the last PING answered); infinite before the first sync.
        The sets are kept while the subscriber is away, so a verifier can go on
        answering from them for a bounded time (see `kit.security`)."""
        return time.monotonic() - self._heard

    def refuses(self, jti: str, user_id: str, issued_at: int) -> bool:
        if jti in self._tokens:
            return True
        cutoff = self._users.get(user_id)
        return cutoff is not None and issued_at < cutoff

    def apply(self, key: str, value: Any) -> None:
        """Records a revocation this process has just written to Redis."""
        self._apply(key, value)
        if self._journal is not None:
            self._journal.append((key, value))

    def _apply(self, key: str, value: Any) -> None:
        if key.startswith(TOKEN_PREFIX):
            self._tokens.add(key[len(TOKEN_PREFIX) :])
        elif key.startswith(USER_PREFIX):
            user_id = key[len(USER_PREFIX) :]
            self._users[user_id] = max(self._users.get(user_id, -math.inf), _cutoff(value))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="kit-revocation-mirror")
            _live.add(self)

    async def aclose(self) -> None:
        """Stops the subscriber. It is asked to stop rather than cancelled first: a
        cancellation landing in redis-py's read with a timeout can be swallowed."""
        _live.discard(self)
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task], timeout=2 * self.heartbeat_seconds + 1.0)
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
            if not task.cancelled() and task.exception() is not None:
                logger.warning("revocation subscriber ended with %r", task.exception())
        self._synced = False

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Waits until `predicate()` holds after some state change (for tests and probes);
        bound it with `asyncio.timeout`."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the subscriber ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.retry_seconds[0]
        while not self._stopping.is_set():
            syncs, pause = self.syncs, delay
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except NotificationsUnavailable as error:
                logger.warning("revocation mirror disabled for now: %s", error)
                pause = self.unsupported_retry_seconds
            except (RedisError, OSError) as error:
                # one warning per outage; the attempts that follow are routine
                log = logger.debug if self._failing else logger.warning
                log("revocation subscriber lost (%s); resyncing", error)
                self._failing = True
            except Exception:  # never die: fall back, reconnect, resync
                logger.exception("revocation subscriber failed; resyncing")
            finally:
                self._synced = False
                await self._notify()
            # back off between failed attempts; a session that synced starts afresh
            delay = (
                self.retry_seconds[0]
                if self.syncs > syncs
                else min(delay * 2, self.retry_seconds[1])
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause if self.syncs == syncs else delay):
                    await self._stopping.wait()

    async def _enable_notifications(self) -> None:
        try:
            config = await self.redis.config_get("notify-keyspace-events")
            flags = "".join(_text(value) for value in config.values())
            have = set(flags) | (set(_ALL_FLAG_EXPANSION) if "A" in flags else set())
            missing = _NEEDED_FLAGS - have
            if missing:
                await self.redis.config_set("notify-keyspace-events", flags + "".join(missing))
        except ResponseError as error:
            raise NotificationsUnavailable(str(error)) from error

    async def _session(self) -> None:
        await self._enable_notifications()
        pubsub: Any = self.redis.pubsub()  # redis-py leaves PubSub untyped
        try:
            await pubsub.psubscribe(f"{self._channel_prefix}{REVOCATION_PREFIX}*")
            confirmation = await pubsub.get_message(timeout=self.lease_seconds)
            if confirmation is None or confirmation["type"] != "psubscribe":
                raise ConnectionError("no subscription confirmation")
            # the SCAN finds every revocation written before it starts; a later
            # one reaches this connection as an event, applied once `_listen`
            # reads it: current after the first PONG, stale from the SCAN's start
            scan_started = time.monotonic()
            self._confirmed = False
            await self._resync()
            self._pings.clear()
            self._heard = scan_started
            self._synced = True
            self.syncs += 1
            if self._failing:
                self._failing = False
                logger.info("revocation mirror resynced")
            await self._notify()
            await self._listen(pubsub)
        finally:
            # bounded: after a cancelled read, redis-py's PubSub.aclose can wait forever
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()

    @contextlib.contextmanager
    def _journaled(self) -> Iterator[list[tuple[str, Any]]]:
        """While a read of Redis is under way: the revocations this process
        applies meanwhile, to apply again over what the read found (a SCAN or
        GET that passed a key before this process wrote it would lose it)."""
        if self._journal is None:
            self._journal = []
        journal = self._journal
        self._journal_readers += 1
        try:
            yield journal
        finally:
            self._journal_readers -= 1
            if not self._journal_readers:
                self._journal = None

    async def _resync(self) -> None:
        tokens: set[str] = set()
        user_keys: list[str] = []
        with self._journaled() as journal:
            start = len(journal)
            scan = self.redis.scan_iter(match=f"{REVOCATION_PREFIX}*", count=_SCAN_BATCH)
            async for raw in scan:
                key = _text(raw)
                if key.startswith(TOKEN_PREFIX):
                    tokens.add(key[len(TOKEN_PREFIX) :])
                elif key.startswith(USER_PREFIX):
                    user_keys.append(key)
            users: dict[str, float] = {}
            for first in range(0, len(user_keys), _SCAN_BATCH):
                batch = user_keys[first : first + _SCAN_BATCH]
                for key, value in zip(batch, await self.redis.mget(batch), strict=True):
                    if value is not None:
                        users[key[len(USER_PREFIX) :]] = _cutoff(value)
            self._tokens, self._users = tokens, users
            for key, value in journal[start:]:
                self._apply(key, value)

    async def _listen(self, pubsub: Any) -> None:
        listening_since = next_ping = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_ping:
                self._pings.append(now)
                await pubsub.ping()
                next_ping = now + self.heartbeat_seconds
            message = await pubsub.get_message(timeout=max(0.0, next_ping - time.monotonic()))
            if message is None:
                # the lease of a session that has not heard a PONG yet runs from
                # its first PING, not from the start of a long SCAN
                if time.monotonic() - max(self._heard, listening_since) >= self.lease_seconds:
                    raise TimeoutError("no PONG within the lease")
                continue
            kind = message["type"]
            if kind == "pong":
                if self._pings:
                    self._heard = self._pings.popleft()
                if not self._confirmed:
                    self._confirmed = True
                    await self._notify()
            elif kind == "pmessage":
                await self._on_event(_text(message["channel"]), _text(message["data"]))
                await self._notify()
            else:  # a (re)subscription confirmation: the client reconnected underneath
                raise ConnectionError(f"unexpected {kind} message")

    async def _on_event(self, channel: str, event: str) -> None:
        key = channel[len(self._channel_prefix) :]
        if event in _IGNORED_EVENTS:
            return
        if key.startswith(TOKEN_PREFIX):
            jti = key[len(TOKEN_PREFIX) :]
            if event == "set":
                self._tokens.add(jti)
            elif event in _GONE_EVENTS:
                self._tokens.discard(jti)
            else:
                await self._reread(key)
        elif key.startswith(USER_PREFIX):
            await self._reread(key)

    async def _reread(self, key: str) -> None:
        self._reading += 1
        with self._journaled() as journal:
            start = len(journal)
            try:
                value = await self.redis.get(key)
            finally:
                self._reading -= 1
            if key.startswith(TOKEN_PREFIX):
                jti = key[len(TOKEN_PREFIX) :]
                if value is None:
                    self._tokens.discard(jti)
                else:
                    self._tokens.add(jti)
            else:
                user_id = key[len(USER_PREFIX) :]
                if value is None:
                    self._users.pop(user_id, None)
                else:
                    self._users[user_id] = _cutoff(value)
            for applied, applied_value in journal[start:]:
                if applied == key:
                    self._apply(applied, applied_value)


def apply_locally(redis: Redis, key: str, value: Any) -> None:
    """Applies a revocation just written through `redis` to this process's mirrors of it."""
    target = _target(redis)
    for mirror in list(_live):
        if _target(mirror.redis) == target:
            mirror.apply(key, value)


def mirrored_cutoff(redis: Redis, user_id: str) -> float | None:
    """The user's revocation time as this process's mirrors of `redis` last saw it."""
    target = _target(redis)
    cutoffs = [
        cutoff
        for mirror in list(_live)
        if _target(mirror.redis) == target and (cutoff := mirror._users.get(user_id)) is not None
    ]
    return max(cutoffs, default=None)
