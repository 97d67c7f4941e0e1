"""Login throttling that holds under concurrency and cannot be turned on the victim.

Every password attempt is counted before the password is checked, in one
atomic Redis script, against three limits:

- per (account, client address): `LOGIN_FAILURES_PER_ACCOUNT_AND_CLIENT` (5)
  per `LOGIN_FAILURE_WINDOW_SECONDS` (15 min): guessing one account from one
  place. Tight, and it touches only that address;
- per client address: `LOGIN_FAILURES_PER_CLIENT` (20) per the same window:
  one place guessing many accounts;
- per account across every address: `LOGIN_FAILURES_PER_ACCOUNT` (100) per
  `LOGIN_ACCOUNT_WINDOW_SECONDS` (1 h): guessing spread over many addresses.
  Loose, so a stranger cannot lock the owner out from elsewhere, and past it
  no hard lock: attempts on the account are spaced by a delay that doubles
  with each one (1 s, 2 s, 4 s ... up to `LOGIN_ACCOUNT_DELAY_MAX_SECONDS`).

Because the count comes first, N concurrent guesses get at most a limit's
worth of password checks; the rest are 429 with `Retry-After`. The attempt
is the failure: a successful login takes its own attempt back from the
address's and account's counts and clears the (account, address) one; an
attempt that never reached the password check (the database failed, say)
is taken back whole. A successful password reset clears every count of the
account. The account is the submitted email (hashed), whether or not it
exists, and every 429 reads the same, so a 429 says nothing about accounts.

Redis unreachable: each replica counts on its own, against
`LOGIN_THROTTLE_FALLBACK_FRACTION` (half) of each limit, so logins go on and
two replicas together allow no more than the normal limits. Counts kept there
are not carried into Redis when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.config import Settings
from auth.errors import InvalidCredentials
from kit.errors import RateLimited, ServiceUnavailable
from kit.pools import RedisBackoff

logger = logging.getLogger("auth.throttle")

# Long enough that a busy machine is not taken for an outage (falling back
# then would count attempts twice and admit more), short enough that a frozen
# Redis delays one login, not all of them (the backoff below skips it).
REDIS_TIMEOUT_SECONDS = 3.0
REDIS_BACKOFF_SECONDS = (1.0, 8.0)
"""After a failure Redis is asked again after 1 s, then 2, 4 and 8 s while it
keeps failing: a frozen Redis holds one login per interval its timeout long."""
LOCAL_ENTRIES_MAX = 100_000
REFUSAL = "Too many failed logins; try again later"


def _account(email: str) -> str:
    """The account's key part: a digest, so Redis holds no email addresses."""
    return hashlib.sha256(email.encode()).hexdigest()[:32]


def pair_failures_key(email: str, client: str) -> str:
    return f"auth:login:failures:pair:{_account(email)}:{client}"


def client_failures_key(client: str) -> str:
    return f"auth:login:failures:client:{client}"


def account_failures_key(email: str) -> str:
    return f"auth:login:failures:account:{_account(email)}"


def account_delay_key(email: str) -> str:
    return f"auth:login:delay:{_account(email)}"


def account_clients_key(email: str) -> str:
    """The addresses with a (account, address) count, so a reset can clear them."""
    return f"auth:login:clients:{_account(email)}"


# KEYS: pair, client, account, account delay, account's clients
# ARGV: pair limit, client limit, account limit, window, account window,
#       longest delay (seconds), client address
# Returns {0, 0} when the attempt is counted, else {1, milliseconds to wait}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function count(key) return tonumber(redis.call('GET', key) or '0') end
local function wait(key)
  local left = redis.call('PTTL', key)
  if left < 0 then left = 1000 end
  return {1, left}
end
if count(KEYS[1]) >= tonumber(ARGV[1]) then return wait(KEYS[1]) end
if count(KEYS[2]) >= tonumber(ARGV[2]) then return wait(KEYS[2]) end
if count(KEYS[3]) >= tonumber(ARGV[3]) then
  local next_at = tonumber(redis.call('HGET', KEYS[4], 'next_at') or '0')
  if now < next_at then return {1, next_at - now} end
  local strikes = redis.call('HINCRBY', KEYS[4], 'strikes', 1)
  local delay = math.floor(math.min(2 ^ (strikes - 1), tonumber(ARGV[6])) * 1000)
  redis.call('HSET', KEYS[4], 'next_at', now + delay)
  local left = redis.call('PTTL', KEYS[3])
  if left > 0 then redis.call('PEXPIRE', KEYS[4], left) end
end
local function bump(key, seconds)
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, seconds) end
end
bump(KEYS[1], ARGV[4])
bump(KEYS[2], ARGV[4])
bump(KEYS[3], ARGV[5])
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('EXPIRE', KEYS[5], math.max(tonumber(ARGV[4]), tonumber(ARGV[5])))
return {0, 0}
"""

# KEYS: pair, client, account; ARGV: 1 to clear the pair (a success), 0 to
# take the attempt back from it (never checked)
_GIVE_BACK = """
local function take_back(key)
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
if ARGV[1] == '1' then redis.call('DEL', KEYS[1]) else take_back(KEYS[1]) end
take_back(KEYS[2])
take_back(KEYS[3])
return 0
"""


@dataclass(frozen=True, slots=True)
class Limits:
    pair: int
    client: int
    account: int
    window_seconds: int
    account_window_seconds: int
    delay_max_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings, *, fraction: float = 1.0) -> Limits:
        def share(limit: int) -> int:
            return max(1, math.ceil(limit * fraction))

        return cls(
            pair=share(settings.login_failures_per_account_and_client),
            client=share(settings.login_failures_per_client),
            account=share(settings.login_failures_per_account),
            window_seconds=settings.login_failure_window_seconds,
            account_window_seconds=settings.login_account_window_seconds,
            delay_max_seconds=settings.login_account_delay_max_seconds,
        )


class LocalCounters:
    """The same limits, counted by one process, for while Redis is away.
    Bounded: past `LOCAL_ENTRIES_MAX` counts the oldest are dropped."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.counts: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self.delays: dict[str, tuple[int, float]] = {}  # account -> (strikes, next at)

    def _count(self, key: str, now: float) -> tuple[int, float]:
        count, expires_at = self.counts.get(key, (0, 0.0))
        return (count, expires_at) if expires_at > now else (0, 0.0)

    def _bump(self, key: str, seconds: int, now: float) -> None:
        count, expires_at = self._count(key, now)
        self.counts.pop(key, None)  # re-inserted last: dicts keep insertion order
        self.counts[key] = (count + 1, expires_at or now + seconds)
        while len(self.counts) > LOCAL_ENTRIES_MAX:
            del self.counts[next(iter(self.counts))]

    def reserve(self, *, pair: str, client: str, account: str) -> float | None:
        """Counts the attempt; or the seconds to wait."""
        now = time.monotonic()
        limits = self.limits
        for key, limit in ((pair, limits.pair), (client, limits.client)):
            count, expires_at = self._count(key, now)
            if count >= limit:
                return expires_at - now
        count, expires_at = self._count(account, now)
        if count >= limits.account:
            strikes, next_at = self.delays.get(account, (0, 0.0))
            if now < next_at:
                return next_at - now
            strikes += 1
            delay = min(2 ** (strikes - 1), limits.delay_max_seconds)
            self.delays[account] = (strikes, now + delay)
        elif account in self.delays:
            del self.delays[account]
        self._bump(pair, limits.window_seconds, now)
        self._bump(client, limits.window_seconds, now)
        self._bump(account, limits.account_window_seconds, now)
        return None

    def give_back(self, *, pair: str, client: str, account: str, succeeded: bool) -> None:
        now = time.monotonic()
        if succeeded:
            self.counts.pop(pair, None)
            keys = [client, account]
        else:
            keys = [pair, client, account]
        for key in keys:
            count, expires_at = self._count(key, now)
            if count > 0:
                self.counts[key] = (count - 1, expires_at)

    def forgive(self, *, account: str, pair_prefix: str) -> None:
        for key in [key for key in self.counts if key.startswith(pair_prefix)]:
            del self.counts[key]
        self.counts.pop(account, None)
        self.delays.pop(account, None)


@dataclass(slots=True)
class Reservation:
    pair: str
    client: str
    account: str
    local: bool


class LoginThrottle:
    """One per process (the local fallback's counts live here)."""

    def __init__(self, *, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.limits = Limits.from_settings(settings)
        self.local = LocalCounters(
            Limits.from_settings(settings, fraction=settings.login_throttle_fallback_fraction)
        )
        self._reserve = redis.register_script(_RESERVE)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._redis = RedisBackoff(first=REDIS_BACKOFF_SECONDS[0], cap=REDIS_BACKOFF_SECONDS[1])

    @contextlib.asynccontextmanager
    async def attempt(self, *, email: str, client: str) -> AsyncIterator[None]:
        """Counts a password attempt before the block checks the password.

        Raises RateLimited (429) past a limit. The block raising
        InvalidCredentials leaves the attempt counted as a failure; the block
        completing is a success; any other exception takes the attempt back.
        """
        reservation = await self.reserve(email=email, client=client)
        try:
            yield
        except InvalidCredentials:
            raise
        except BaseException:
            await self.give_back(reservation, succeeded=False)
            raise
        await self.give_back(reservation, succeeded=True)

    async def reserve(self, *, email: str, client: str) -> Reservation:
        pair, client_key, account = (
            pair_failures_key(email, client),
            client_failures_key(client),
            account_failures_key(email),
        )
        keys = [pair, client_key, account]
        if self._redis_usable():
            limits = self.limits
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                    refused, wait_ms = await self._reserve(
                        keys=[*keys, account_delay_key(email), account_clients_key(email)],
                        args=[
                            limits.pair,
                            limits.client,
                            limits.account,
                            limits.window_seconds,
                            limits.account_window_seconds,
                            limits.delay_max_seconds,
                            client,
                        ],
                    )
            except (RedisError, OSError, TimeoutError) as error:
                self._redis_failed(error)
            else:
                if self._redis.answered():
                    logger.info("login throttling counts in Redis again")
                if int(refused):
                    raise RateLimited(REFUSAL, retry_after=math.ceil(int(wait_ms) / 1000))
                return Reservation(pair, client_key, account, local=False)
        wait = self.local.reserve(pair=pair, client=client_key, account=account)
        if wait is not None:
            raise RateLimited(REFUSAL, retry_after=math.ceil(wait))
        return Reservation(pair, client_key, account, local=True)

    async def give_back(self, reservation: Reservation, *, succeeded: bool) -> None:
        keys = [reservation.pair, reservation.client, reservation.account]
        if reservation.local:
            self.local.give_back(pair=keys[0], client=keys[1], account=keys[2], succeeded=succeeded)
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._give_back(keys=keys, args=[1 if succeeded else 0])
        except (RedisError, OSError, TimeoutError) as error:
            # the count stays a little high until its window ends
            self._redis_failed(error)

    async def forgive(self, *, email: str) -> None:
        """Clears every count of the account (after a successful password reset)."""
        account = _account(email)
        self.local.forgive(
            account=account_failures_key(email),
            pair_prefix=f"auth:login:failures:pair:{account}:",
        )
        clients_key = account_clients_key(email)
        try:
            clients = await self.redis.smembers(clients_key)
            await self.redis.delete(
                *(
                    pair_failures_key(email, raw.decode() if isinstance(raw, bytes) else raw)
                    for raw in clients
                ),
                account_failures_key(email),
                account_delay_key(email),
                clients_key,
            )
        except (RedisError, OSError) as error:
            self._redis_failed(error)

    def _redis_usable(self) -> bool:
        return self._redis.usable()

    def _redis_failed(self, error: BaseException) -> None:
        if self._redis.failed():
            logger.warning(
                "login throttling cannot reach Redis (%s); this replica counts on its own",
                error or type(error).__name__,
            )


def reset_emails_key(email: str) -> str:
    return f"auth:password-reset:emails:{_account(email)}"


def verification_emails_key(email: str) -> str:
    return f"auth:email-verification:emails:{_account(email)}"


async def count_email(
    *, redis: Redis, key: str, window_seconds: int, limit: int, what: str
) -> bool:
    """Counts one email under `key` for its window; False past `limit`.

    Whatever this answers, the client gets the same 202: the limit protects
    the mailbox from being flooded, and says nothing about the account.
    Redis being down fails closed (503): an uncounted email could flood a mailbox.
    """
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=window_seconds, nx=True)
            pipe.incr(key)
            _, count = await pipe.execute()
    except RedisError as error:
        logger.warning(
            "%s emails cannot be counted (%s: %s); answered 503", what, type(error).__name__, error
        )
        raise ServiceUnavailable(f"{what} throttling is unavailable; retry") from error
    return int(count) <= limit


@contextlib.asynccontextmanager
async def email_allowance(
    *, redis: Redis, key: str, window_seconds: int, limit: int, what: str
) -> AsyncIterator[bool]:
    """Counts one email under `key` and yields whether it may go; an email
    counted whose request then failed (the database away: a 503 the client
    retries, as told) is given back, so retries spend no allowance."""
    allowed = await count_email(
        redis=redis, key=key, window_seconds=window_seconds, limit=limit, what=what
    )
    try:
        yield allowed
    except BaseException:
        with contextlib.suppress(RedisError, OSError):
            await redis.decr(key)
        raise


def reset_email_allowance(
    *, redis: Redis, settings: Settings, email: str
) -> contextlib.AbstractAsyncContextManager[bool]:
    """One reset email for the account; False past the window's limit."""
    return email_allowance(
        redis=redis,
        key=reset_emails_key(email),
        window_seconds=settings.password_reset_window_seconds,
        limit=settings.password_reset_emails_per_account,
        what="Reset",
    )


def verification_email_allowance(
    *, redis: Redis, settings: Settings, email: str
) -> contextlib.AbstractAsyncContextManager[bool]:
    """One verification email for the address; False past the window's limit."""
    return email_allowance(
        redis=redis,
        key=verification_emails_key(email),
        window_seconds=settings.email_verification_window_seconds,
        limit=settings.email_verification_emails_per_account,
        what="Verification",
    )
