"""Password hashing with argon2id, off the event loop.

Hashing at OWASP's parameters costs tens of milliseconds of CPU, so every
hash and verify runs in a worker thread. Verifying an unknown account's
password against a dummy hash makes that 401 cost what a wrong password costs.

Each hash in progress holds `ARGON2_MEMORY_COST_KIB` (19 MiB) of memory, so at
most `ARGON2_MAX_CONCURRENT` run at once: a burst of logins then waits its turn
instead of growing the process past its memory limit (the default thread pool
alone would allow one per core plus four, up to 32). More at once than there
are cores would not finish sooner anyway.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from auth.config import Settings


class Passwords:
    def __init__(
        self, *, memory_cost_kib: int, time_cost: int, parallelism: int, max_concurrent: int = 4
    ) -> None:
        self.hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost_kib,
            parallelism=parallelism,
            type=Type.ID,
        )
        self._dummy_hash: str | None = None
        self._slots = asyncio.Semaphore(max_concurrent)

    @classmethod
    def from_settings(cls, settings: Settings) -> Passwords:
        return cls(
            memory_cost_kib=settings.argon2_memory_cost_kib,
            time_cost=settings.argon2_time_cost,
            parallelism=settings.argon2_parallelism,
            max_concurrent=settings.argon2_max_concurrent,
        )

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        async with self._slots:
            return await asyncio.to_thread(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self.hasher.check_needs_rehash(password_hash)

    async def burn_verify(self, password: str) -> None:
        """Spends one verification's time on a dummy hash, for unknown accounts."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy_hash, password)
