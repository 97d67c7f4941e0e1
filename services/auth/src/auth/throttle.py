"""Login throttling: failed logins counted in Redis per account and per client.

Each counter is a fixed window that starts at the first failure. Past the
limit, every login for that account (or from that client) answers 429 with
`Retry-After` until the window ends, whether or not the password is right,
and whether or not the account exists, so the 429 reveals nothing either.
Redis being down fails closed (503): an unthrottled login is a brute-force
window.
"""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.config import Settings
from kit.errors import RateLimited, ServiceUnavailable


def _account(email: str) -> str:
    """The account's key part: a digest, so Redis holds no email addresses."""
    return hashlib.sha256(email.encode()).hexdigest()[:32]


def account_failures_key(email: str) -> str:
    return f"auth:login:failures:account:{_account(email)}"


def client_failures_key(client: str) -> str:
    return f"auth:login:failures:client:{client}"


class LoginThrottle:
    def __init__(self, *, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    async def ensure_allowed(self, *, email: str, client: str) -> None:
        limits = (
            (account_failures_key(email), self.settings.login_failures_per_account),
            (client_failures_key(client), self.settings.login_failures_per_client),
        )
        try:
            counts = await self.redis.mget([key for key, _ in limits])
            for (key, limit), count in zip(limits, counts, strict=True):
                if count is not None and int(count) >= limit:
                    ttl = await self.redis.ttl(key)
                    raise RateLimited(
                        "Too many failed logins; try again later",
                        retry_after=ttl if ttl > 0 else self.settings.login_failure_window_seconds,
                    )
        except RedisError as error:
            raise ServiceUnavailable("Login throttling is unavailable; retry") from error

    async def record_failure(self, *, email: str, client: str) -> None:
        window = self.settings.login_failure_window_seconds
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in (account_failures_key(email), client_failures_key(client)):
                    pipe.set(key, 0, ex=window, nx=True)
                    pipe.incr(key)
                await pipe.execute()
        except RedisError as error:
            raise ServiceUnavailable("Login throttling is unavailable; retry") from error

    async def record_success(self, *, email: str) -> None:
        try:
            await self.redis.delete(account_failures_key(email))
        except RedisError as error:
            raise ServiceUnavailable("Login throttling is unavailable; retry") from error


def reset_emails_key(email: str) -> str:
    return f"auth:password-reset:emails:{_account(email)}"


async def allow_reset_email(*, redis: Redis, settings: Settings, email: str) -> bool:
    """Counts one reset email for the account; False past the window's limit.

    Whatever this answers, the client gets the same 202: the limit protects
    the mailbox from being flooded, and says nothing about the account.
    Redis being down fails closed (503), like the login throttle.
    """
    key = reset_emails_key(email)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=settings.password_reset_window_seconds, nx=True)
            pipe.incr(key)
            _, count = await pipe.execute()
    except RedisError as error:
        raise ServiceUnavailable("Reset throttling is unavailable; retry") from error
    return int(count) <= settings.password_reset_emails_per_account
