"""Edge authentication with a cache of verified signatures.

Verifying an ES256 signature costs far more than proxying a small request, and
clients send the same access token many times. A token whose signature and
claims were verified once is remembered until it expires; revocation is still
asked of Redis on every request, so logout takes effect at once.
"""

from __future__ import annotations

import time

from kit.security import Principal, TokenVerifier

MAX_CACHED_TOKENS = 10_000


class EdgeAuthenticator:
    def __init__(self, verifier: TokenVerifier, *, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self.verifier = verifier
        self.max_entries = max_entries
        self._verified: dict[str, Principal] = {}

    async def principal(self, token: str) -> Principal:
        """The token's principal; raises Unauthenticated (or ServiceUnavailable)."""
        cached = self._verified.get(token)
        if cached is not None and cached.expires_at > time.time():
            await self.verifier.ensure_not_revoked(cached)
            return cached
        principal = await self.verifier.verify(token)
        if len(self._verified) >= self.max_entries:
            # dicts keep insertion order: drop the oldest entry
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = principal
        return principal
