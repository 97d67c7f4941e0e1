"""Access-token verification, shared by every service and the gateway.

Tokens are signed by auth with an asymmetric key named by `kid`; everyone
else verifies them against auth's JWKS. The algorithm allow-list is explicit
(so `alg: none` and HS256-with-the-public-key are refused before any key is
touched), keys are parsed once and cached by `kid`, and a revoked `jti` (or a
user revoked wholesale) is refused through Redis.

A token whose signature and claims verified is remembered (bounded LRU keyed
by the token string) until its `exp`: expiry and its key's presence in the key
source are re-checked on every hit, and failures are never remembered.
Revocation is answered from a per-process mirror of the Redis revocation list
(`kit.revocations`) while the verifier is started and the mirror is current,
and by a Redis round trip per request otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

import httpx
from jose import ExpiredSignatureError, JWTError, jwk, jwt
from jose.backends.base import Key
from jose.exceptions import JWTClaimsError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kit.errors import ServiceUnavailable, Unauthenticated
from kit.revocations import TOKEN_PREFIX, USER_PREFIX, RevocationMirror, apply_locally
from kit.settings import ServiceSettings

logger = logging.getLogger("kit.security")

ACCESS_TOKEN_TYPE = "access"
_REQUIRED_CLAIMS = {
    "require_exp": True,
    "require_iat": True,
    "require_iss": True,
    "require_aud": True,
    "require_sub": True,
    "require_jti": True,
}


MAX_CACHED_TOKENS = 4096
ISSUED_AT_LEEWAY_SECONDS = 60  # clock skew between auth and a verifier
_now = time.time  # the cache's clock (a module attribute so tests can move it)


def revoked_token_key(jti: str) -> str:
    return f"{TOKEN_PREFIX}{jti}"


def revoked_user_key(user_id: str) -> str:
    """Holds a unix time: that user's tokens issued before it are refused."""
    return f"{USER_PREFIX}{user_id}"


async def revoke_token(redis: Redis, jti: str, *, ttl: int) -> None:
    """Revokes one access token everywhere; raises RedisError if Redis is unreachable."""
    key = revoked_token_key(jti)
    await redis.set(key, "1", ex=ttl)
    apply_locally(redis, key, "1")


async def revoke_user(redis: Redis, user_id: str, *, before: float, ttl: int) -> None:
    """Revokes every token of the user issued before `before` (unix time), everywhere."""
    key = revoked_user_key(user_id)
    await redis.set(key, repr(before), ex=ttl)
    apply_locally(redis, key, before)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified access token speaks for."""

    user_id: str
    name: str
    roles: frozenset[str]
    jti: str
    issued_at: int
    expires_at: int
    email_verified: bool = False

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    key: Key


class KeySource(Protocol):
    async def key_for(self, kid: str) -> VerificationKey | None: ...


def parse_jwks(
    document: Mapping[str, Any], algorithms: Iterable[str]
) -> dict[str, VerificationKey]:
    """Parses every usable key of a JWKS once; keys for other algorithms are ignored."""
    allowed = set(algorithms)
    keys: dict[str, VerificationKey] = {}
    for entry in document.get("keys", []):
        kid, algorithm = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str) or algorithm not in allowed or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = VerificationKey(kid, algorithm, jwk.construct(entry, algorithm))
        except JWTError:
            logger.warning("skipping unusable JWKS key %s", kid)
    return keys


class JwksKeySource:
    """Keys from a JWKS URL, cached; an unknown `kid` refetches at most every few seconds."""

    def __init__(
        self,
        url: str,
        *,
        http: httpx.AsyncClient,
        algorithms: Iterable[str],
        min_refresh_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.http = http
        self.algorithms = tuple(algorithms)
        self.min_refresh_seconds = min_refresh_seconds
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str) -> VerificationKey | None:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            if kid not in self._keys and self._refresh_due():
                await self.refresh()
        return self._keys.get(kid)

    def _refresh_due(self) -> bool:
        return time.monotonic() - self._fetched_at >= self.min_refresh_seconds

    async def refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            response = await self.http.get(self.url, timeout=5.0)
            response.raise_for_status()
            self._keys = parse_jwks(response.json(), self.algorithms)
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("JWKS fetch from %s failed: %s", self.url, error)


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    principal: Principal
    key: VerificationKey


class TokenVerifier:
    """Verifies access tokens. `start()` (or `async with`) runs the revocation
    mirror; without it every verification asks Redis, as does any moment the
    mirror is not current."""

    def __init__(
        self,
        *,
        keys: KeySource,
        issuer: str,
        audience: str,
        algorithms: Iterable[str],
        redis: Redis | None,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        max_lifetime_seconds: int | None = None,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = frozenset(algorithms)
        self.redis = redis
        self.max_cached_tokens = max_cached_tokens
        self.max_lifetime_seconds = max_lifetime_seconds
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self.revocations: RevocationMirror | None = None

    @classmethod
    def for_service(
        cls,
        settings: ServiceSettings,
        *,
        redis: Redis | None,
        keys: KeySource | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> TokenVerifier:
        """The verifier a service's settings describe; keys from the JWKS URL
        (fetched with `http`) unless a key source is given (auth's own, a test's)."""
        if keys is None:
            if http is None:
                raise ValueError("a JWKS key source needs an HTTP client")
            keys = JwksKeySource(
                str(settings.jwks_url), http=http, algorithms=settings.jwt_algorithms
            )
        return cls(
            keys=keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            redis=redis,
            max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
        )

    async def start(self) -> None:
        if self.redis is not None and self.revocations is None:
            self.revocations = RevocationMirror(self.redis)
            self.revocations.start()

    async def aclose(self) -> None:
        mirror, self.revocations = self.revocations, None
        if mirror is not None:
            await mirror.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def verify(self, token: str) -> Principal:
        principal = (await self._verified_token(token)).principal
        await self.ensure_not_revoked(principal)
        return principal

    async def verified_claims(self, token: str) -> dict[str, Any]:
        return dict((await self._verified_token(token)).claims)

    async def _verified_token(self, token: str) -> _Verified:
        entry = self._verified.get(token)
        if entry is not None:
            if _now() >= entry.principal.expires_at:
                self._verified.pop(token, None)
                raise Unauthenticated("Token expired")
            if await self.keys.key_for(entry.key.kid) is entry.key:
                self._verified.move_to_end(token)
                return entry
            self._verified.pop(token, None)  # its key is gone or was reloaded: verify afresh
        claims, key = await self._decode(token)
        entry = _Verified(claims, _principal(claims), key)
        self._verified[token] = entry
        if len(self._verified) > self.max_cached_tokens:
            self._verified.popitem(last=False)
        return entry

    async def _decode(self, token: str) -> tuple[dict[str, Any], VerificationKey]:
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as error:
            raise Unauthenticated("Malformed token") from error
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self.algorithms:
            raise Unauthenticated("Token algorithm is not allowed")
        if not isinstance(kid, str):
            raise Unauthenticated("Token has no key id")
        key = await self.keys.key_for(kid)
        if key is None or key.algorithm != algorithm:
            raise Unauthenticated("Token signed by an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options=_REQUIRED_CLAIMS,
            )
        except ExpiredSignatureError as error:
            raise Unauthenticated("Token expired") from error
        except JWTClaimsError as error:
            raise Unauthenticated("Token claims are invalid") from error
        except JWTError as error:
            raise Unauthenticated("Invalid token") from error
        if claims.get("typ") != ACCESS_TOKEN_TYPE:
            raise Unauthenticated("Not an access token")
        if self.max_lifetime_seconds is not None:
            check_lifetime(claims, self.max_lifetime_seconds)
        return claims, key

    async def ensure_not_revoked(self, principal: Principal) -> None:
        if self.redis is None:
            return
        mirror = self.revocations
        if mirror is not None and mirror.current():
            if mirror.refuses(principal.jti, principal.user_id, principal.issued_at):
                raise Unauthenticated("Token revoked")
            return
        try:
            token_revoked, user_revoked_before = await self.redis.mget(
                revoked_token_key(principal.jti), revoked_user_key(principal.user_id)
            )
        except RedisError as error:
            raise ServiceUnavailable("Token revocation list is unreachable; retry") from error
        if token_revoked is not None:
            raise Unauthenticated("Token revoked")
        if user_revoked_before is not None and principal.issued_at < float(user_revoked_before):
            raise Unauthenticated("Token revoked")


def check_lifetime(claims: Mapping[str, Any], max_lifetime_seconds: int) -> None:
    """Refuses a token that claims to live longer than the maximum, or to be
    issued in the future (beyond clock skew): whoever holds a signing key, or
    a bug, cannot mint a token that outlives the bound."""
    issued_at, expires_at = claims["iat"], claims["exp"]
    if not isinstance(issued_at, int | float) or not isinstance(expires_at, int | float):
        raise Unauthenticated("Token claims are invalid")
    if issued_at > _now() + ISSUED_AT_LEEWAY_SECONDS:
        raise Unauthenticated("Token issued in the future")
    if expires_at - issued_at > max_lifetime_seconds:
        raise Unauthenticated("Token lifetime exceeds the maximum")


def _principal(claims: Mapping[str, Any]) -> Principal:
    return Principal(
        user_id=str(claims["sub"]),
        name=str(claims.get("name", "")),
        roles=frozenset(claims.get("roles", [])),
        jti=str(claims["jti"]),
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        email_verified=claims.get("email_verified") is True,
    )


def bearer_from_headers(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def bearer_from_subprotocols(subprotocols: Iterable[str]) -> str | None:
    """Browsers send the token as the subprotocol pair `bearer, <token>`."""
    offered = list(subprotocols)
    for index, name in enumerate(offered[:-1]):
        if name == "bearer":
            return offered[index + 1]
    return None


class StaticKeySource:
    """A fixed set of keys: auth's own key ring, or a test's."""

    def __init__(self, keys: Mapping[str, VerificationKey]) -> None:
        self._keys = dict(keys)

    async def key_for(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)
