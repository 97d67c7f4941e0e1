"""Access-token verification, shared by every service and the gateway.

Tokens are signed by auth with an asymmetric key named by `kid`; everyone
else verifies them against auth's JWKS (`JwksKeySource`: loaded at start-up,
refreshed on a schedule, kept while auth is unreachable). The algorithm
allow-list is explicit (so `alg: none` and HS256-with-the-public-key are
refused before any key is touched), keys are parsed once and cached by `kid`,
and a revoked `jti` (or a user revoked wholesale) is refused through Redis.

A token that is bad is a 401 (`Unauthenticated`); a token that cannot be
checked right now (its key cannot be fetched, the revocation list cannot be
read) is a 503 with `Retry-After` (`ServiceUnavailable`), never a 401: clients
log their user out on a 401.

A token whose signature and claims verified is remembered (bounded LRU keyed
by the token string) until its `exp`: expiry and its key's presence in the key
source are re-checked on every hit, and failures are never remembered.
Revocation is answered from a per-process mirror of the Redis revocation list
(`kit.revocations`) while the verifier is started and the mirror is current,
by a Redis round trip per request otherwise, and from the mirror's last sync
for a bounded time when Redis cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

import httpx
from jose import ExpiredSignatureError, JWTError, jwk, jwt
from jose.backends.base import Key
from jose.exceptions import JWTClaimsError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kit.errors import ServiceUnavailable, Unauthenticated
from kit.revocations import (
    TOKEN_PREFIX,
    USER_PREFIX,
    RevocationMirror,
    apply_locally,
    mirrored_cutoff,
)
from kit.settings import ServiceSettings
from kit.tasks import cancel_and_wait

logger = logging.getLogger("kit.security")
T = TypeVar("T")

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
# verifiers share the key set they fetched through Redis, for a day at most
SHARED_JWKS_PREFIX = "kit:jwks:"
SHARED_JWKS_TTL_SECONDS = 86_400
# after Redis failed to answer a revocation check, it is left alone this long
REDIS_BACKOFF_SECONDS = 1.0
# the longest a revocation lookup waits for Redis before answering without it
REDIS_TIMEOUT_SECONDS = 0.5
# how long a stopping verifier waits for a Redis call it gave up on, before cancelling it
STRAGGLER_GRACE_SECONDS = 1.0
ISSUED_AT_LEEWAY_SECONDS = 60  # clock skew between auth and a verifier
_now = time.time  # the cache's clock (a module attribute so tests can move it)


class Deadline:
    """Waits for Redis calls at most `seconds`, without cancelling them.

    Cancelling a call still resolving the server's name leaves uvloop logging
    "Future exception was never retrieved" once the lookup fails, so a call
    given up on (or whose caller was cancelled) is left to finish (the client's
    own timeouts, or Redis answering, end it). While one runs, Redis counts as
    unresponsive and further calls fail at once: a frozen Redis holds at most
    one call per deadline, plus those already under way when it froze.

    A call left running still holds the Redis client: one stuck connecting
    when the client's pool is closed opens its connection afterwards, in a
    pool nobody closes again. So whoever owns a deadline closes it
    (`aclose`) when it stops, before the Redis client is closed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._stragglers: set[asyncio.Future[Any]] = set()

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if any(not straggler.done() for straggler in self._stragglers):
            raise TimeoutError("an earlier call to Redis has not finished")
        task = asyncio.ensure_future(call())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.seconds)
        finally:
            if not task.done():
                self._stragglers.add(task)
                task.add_done_callback(self._stragglers.discard)
                task.add_done_callback(_consume)
        if not done:
            raise TimeoutError(f"Redis did not answer within {self.seconds:g} s")
        return task.result()

    async def aclose(self) -> None:
        """Ends the calls given up on that still run: they have
        `STRAGGLER_GRACE_SECONDS` to finish, then are cancelled and waited for
        (a few times at most: one that will not end is logged and left behind
        rather than holding the shutdown)."""
        pending = {straggler for straggler in self._stragglers if not straggler.done()}
        if pending:
            await asyncio.wait(pending, timeout=STRAGGLER_GRACE_SECONDS)
        for _ in range(3):
            pending = {straggler for straggler in pending if not straggler.done()}
            if not pending:
                return
            for straggler in pending:
                straggler.cancel()
            await asyncio.wait(pending, timeout=1.0)
        logger.error("a Redis call given up on would not stop; closing without it")


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


_login_deadlines: weakref.WeakKeyDictionary[Redis, Deadline] = weakref.WeakKeyDictionary()


def _logins(redis: Redis) -> Deadline:
    """The deadline of `user_revoked_before`'s reads through `redis`."""
    deadline = _login_deadlines.get(redis)
    if deadline is None:
        deadline = _login_deadlines[redis] = Deadline(REDIS_TIMEOUT_SECONDS)
    return deadline


async def settle_redis_calls(redis: Redis) -> None:
    """Ends the calls through `redis` that module-level helpers
    (`user_revoked_before`) gave up on and left running; called before the
    client is closed (`kit.lifespan.open_redis` does)."""
    deadline = _login_deadlines.pop(redis, None)
    if deadline is not None:
        await deadline.aclose()


def revoked_token_key(jti: str) -> str:
    return f"{TOKEN_PREFIX}{jti}"


def revoked_user_key(user_id: str) -> str:
    """Holds a unix time: that user's tokens issued before it are refused."""
    return f"{USER_PREFIX}{user_id}"


def revoked_by(issued_at: float, token_marker: object, user_marker: Any) -> bool:
    """The revocation rule, given what Redis holds under `revoked_token_key` and
    `revoked_user_key`: the token itself was revoked, or its user's tokens
    issued before the cutoff were."""
    return token_marker is not None or (user_marker is not None and issued_at < float(user_marker))


async def revoke_token(redis: Redis, jti: str, *, ttl: int) -> None:
    """Revokes one access token everywhere; raises RedisError if Redis is unreachable."""
    key = revoked_token_key(jti)
    await redis.set(key, "1", ex=ttl)
    apply_locally(redis, key, "1")


async def user_revoked_before(redis: Redis, user_id: str) -> float | None:
    """The time before which the user's tokens are refused, if any: from Redis,
    or, while Redis cannot answer, as this process's revocation mirror last saw it
    (nobody can write a new one meanwhile)."""
    try:
        marker = await _logins(redis).run(lambda: redis.get(revoked_user_key(user_id)))
    except (RedisError, OSError, TimeoutError):
        return mirrored_cutoff(redis, user_id)
    return None if marker is None else float(marker)


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
    # the login session (auth's refresh-token family) a user's token was issued
    # in; None for a machine client's token
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    key: Key


class KeySource(Protocol):
    async def key_for(self, kid: str) -> VerificationKey | None:
        """The key named `kid`; None if the issuer does not publish it. Raises
        `ServiceUnavailable` when that cannot be told right now."""
        ...


def parse_jwks(
    document: Mapping[str, Any], algorithms: Iterable[str]
) -> dict[str, VerificationKey]:
    """Parses every usable key of a JWKS once; keys for other algorithms are ignored."""
    allowed = set(algorithms)
    keys: dict[str, VerificationKey] = {}
    entries = document.get("keys")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        kid, algorithm = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str) or algorithm not in allowed or entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = VerificationKey(kid, algorithm, jwk.construct(entry, algorithm))
        except JWTError:
            logger.warning("skipping unusable JWKS key %s", kid)
    return keys


def _max_age(cache_control: str | None) -> float | None:
    """The `max-age` of a Cache-Control header, 0 for `no-store`/`no-cache`."""
    if not cache_control:
        return None
    directives = [part.strip().lower() for part in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age" and value.strip().isdigit():
            return float(value.strip())
    return None


def shared_jwks_key(url: str) -> str:
    """Where verifiers keep the last key set they fetched from `url`, for each other."""
    return f"{SHARED_JWKS_PREFIX}{url}"


class JwksKeySource:
    """auth's key set, as every verifier outside auth sees it.

    - `start()` loads it at once in the background and refreshes it on a
      schedule: the JWKS's `Cache-Control: max-age`, bounded by
      `min_refresh_seconds` below and `refresh_seconds` above. A key auth
      stops publishing is therefore no longer trusted after that long.
    - While auth is unreachable the last good keys stay in use, and the
      background task retries with backoff (`retry_seconds`).
    - An unknown `kid` re-fetches at once, at most every `min_refresh_seconds`
      (concurrent requests share the one fetch). If auth answered and does not
      publish the kid, `key_for` returns None (the token is refused: 401); if
      auth could not be asked, it raises `ServiceUnavailable` (503, retry):
      a valid token is never called invalid because auth is down.
    - Every successful fetch is also written to Redis (`shared_jwks_key`), and
      while auth is unreachable a verifier adopts that copy when it is newer
      than what it holds, so a replica started during an auth outage still
      verifies tokens. The copy is never preferred to auth's own answer.
    """

    def __init__(
        self,
        url: str,
        *,
        http: httpx.AsyncClient,
        algorithms: Iterable[str],
        redis: Redis | None = None,
        refresh_seconds: float = 60.0,
        min_refresh_seconds: float = 5.0,
        retry_seconds: tuple[float, float] = (0.5, 10.0),
        fetch_timeout_seconds: float = 3.0,
        redis_timeout_seconds: float = 0.5,
    ) -> None:
        self.url = url
        self.http = http
        self.algorithms = tuple(algorithms)
        self.redis = redis
        self.refresh_seconds = max(refresh_seconds, min_refresh_seconds)
        self.min_refresh_seconds = min_refresh_seconds
        self.retry_seconds = retry_seconds
        self.fetch_timeout_seconds = fetch_timeout_seconds
        self._deadline = Deadline(redis_timeout_seconds)
        self.refresh_interval = self.refresh_seconds  # max-age of the last answer, bounded
        self._keys: dict[str, VerificationKey] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._answered = False  # whether the last attempt got auth's answer
        self._attempted_at = -math.inf  # monotonic
        self._document_time = -math.inf  # wall clock of the key set held (ours or shared)
        self._failing_since: float | None = None  # monotonic
        self._last_error = ""
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()

    # --- what verification asks ------------------------------------------------------

    async def key_for(self, kid: str) -> VerificationKey | None:
        key = self._keys.get(kid)
        if key is not None:
            return key
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        elif time.monotonic() - self._attempted_at >= self.min_refresh_seconds:
            await self.refresh()
        key = self._keys.get(kid)
        if key is not None or self._answered:
            return key
        raise ServiceUnavailable(
            "The token's signing key cannot be fetched from auth right now; retry",
            headers={"Retry-After": str(self._retry_after())},
        )

    def _retry_after(self) -> int:
        wait = self.min_refresh_seconds - (time.monotonic() - self._attempted_at)
        return max(1, math.ceil(min(max(wait, 0.0), self.min_refresh_seconds)))

    @property
    def kids(self) -> frozenset[str]:
        """The key ids held now."""
        return frozenset(self._keys)

    @property
    def answered(self) -> bool:
        """Whether the last attempt to reach auth succeeded."""
        return self._answered

    def describe(self) -> str:
        """One line for `/readyz`: "ok ..." or what is wrong."""
        count = len(self._keys)
        if self._answered:
            return f"ok: {count} key(s), refreshed every {self.refresh_interval:g} s"
        if self._failing_since is None:
            return "not loaded yet"
        down = time.monotonic() - self._failing_since
        held = f"using {count} cached key(s)" if count else "no keys yet"
        return f"auth unreachable for {down:.0f} s ({self._last_error}); {held}"

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kit-jwks-refresh")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        inflight, self._inflight = self._inflight, None
        for pending in (task, inflight):
            if pending is not None:
                await cancel_and_wait(pending)
        # a Redis call the fetch gave up on (or was cancelled in) ends before Redis closes
        await self._deadline.aclose()

    async def _run(self) -> None:
        delay = self.retry_seconds[0]
        while True:
            if await self.refresh():
                delay = self.retry_seconds[0]
                wait = self.refresh_interval
            else:
                wait = min(delay, self.refresh_interval)
                delay = min(delay * 2, self.retry_seconds[1])
            # a fetch failing elsewhere (an unknown kid) ends a long wait: retry sooner
            self._failed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._failed.wait()

    # --- fetching ----------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Fetches the key set now (joining a fetch already under way); True if auth answered."""
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.ensure_future(self._fetch())

            def forget(done: asyncio.Task[bool]) -> None:
                if self._inflight is done:
                    self._inflight = None

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def _fetch(self) -> bool:
        self._attempted_at = time.monotonic()
        try:
            response = await self.http.get(self.url, timeout=self.fetch_timeout_seconds)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict):
                raise TypeError("the JWKS is not a JSON object")
            self._adopt(document, fetched_at=time.time())
        except (httpx.HTTPError, ValueError, TypeError) as error:
            self._answered = False
            self._last_error = f"{type(error).__name__}: {error}"[:160]
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self._failed.set()
                logger.warning("JWKS fetch from %s failed: %s", self.url, self._last_error)
            await self._adopt_shared_copy()
            return False
        max_age = _max_age(response.headers.get("cache-control"))
        self.refresh_interval = min(
            self.refresh_seconds,
            max(self.min_refresh_seconds, self.refresh_seconds if max_age is None else max_age),
        )
        await self._share(document)
        if self._failing_since is not None:
            logger.info("JWKS fetched from %s again", self.url)
        self._answered, self._failing_since = True, None
        return True

    def _adopt(self, document: Mapping[str, Any], *, fetched_at: float) -> None:
        """Holds the keys of `document`; an unchanged key keeps its parsed object,
        so tokens verified with it stay in the verifier's cache."""
        keys = parse_jwks(document, self.algorithms)
        listed = document.get("keys")
        entries = {
            entry["kid"]: dict(entry)
            for entry in (listed if isinstance(listed, list) else [])
            if isinstance(entry, dict) and entry.get("kid") in keys
        }
        for kid in keys:
            if self._entries.get(kid) == entries.get(kid) and kid in self._keys:
                keys[kid] = self._keys[kid]
        self._keys, self._entries, self._document_time = keys, entries, fetched_at

    async def _share(self, document: Mapping[str, Any]) -> None:
        if self.redis is None:
            return
        copy = json.dumps({"fetched_at": self._document_time, "jwks": document})
        redis = self.redis
        try:
            await self._deadline.run(
                lambda: redis.set(shared_jwks_key(self.url), copy, ex=SHARED_JWKS_TTL_SECONDS)
            )
        except (RedisError, OSError, TimeoutError) as error:
            logger.debug("could not share the JWKS through Redis: %s", error)

    async def _adopt_shared_copy(self) -> None:
        redis = self.redis
        if redis is None:
            return
        try:
            raw = await self._deadline.run(lambda: redis.get(shared_jwks_key(self.url)))
            if raw is None:
                return
            copy = json.loads(raw)
            fetched_at, document = float(copy["fetched_at"]), copy["jwks"]
        except (RedisError, OSError, TimeoutError, ValueError, TypeError, KeyError) as error:
            logger.debug("no usable shared JWKS copy: %s", error)
            return
        if fetched_at > self._document_time and isinstance(document, dict):
            self._adopt(document, fetched_at=fetched_at)
            logger.warning(
                "auth unreachable: verifying with the key set another verifier fetched %.0f s ago",
                max(0.0, time.time() - fetched_at),
            )


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    principal: Principal
    key: VerificationKey


class TokenVerifier:
    """Verifies access tokens. `start()` (or `async with`) runs the revocation
    mirror and the key source's refresh; without it every verification asks
    Redis, as does any moment the mirror is not current.

    Revocation while Redis cannot be asked: the mirror answers from its last
    sync for `max_staleness_seconds`, then verification fails closed (503).
    Redis being down means nobody can write a revocation either, so the mirror
    misses only what was written in the instant before; the bound covers the
    case where only this process has lost Redis while others still write."""

    def __init__(
        self,
        *,
        keys: KeySource,
        issuer: str,
        audience: str,
        algorithms: Iterable[str],
        redis: Redis | None,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        max_staleness_seconds: float = 30.0,
        redis_timeout_seconds: float = REDIS_TIMEOUT_SECONDS,
        max_lifetime_seconds: int | None = None,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = frozenset(algorithms)
        self.redis = redis
        self.max_cached_tokens = max_cached_tokens
        self.max_staleness_seconds = max_staleness_seconds
        # well inside the half second kit.health gives an optional check
        self._deadline = Deadline(min(redis_timeout_seconds, 0.4))
        self.max_lifetime_seconds = max_lifetime_seconds
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._redis_down_until = -math.inf
        self._redis_failing = False
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
        (fetched with `http`, shared through `redis`) unless a key source is
        given (auth's own, a test's)."""
        if keys is None:
            if http is None:
                raise ValueError("a JWKS key source needs an HTTP client")
            keys = JwksKeySource(
                str(settings.jwks_url),
                http=http,
                algorithms=settings.jwt_algorithms,
                redis=redis,
                refresh_seconds=settings.jwks_refresh_seconds,
            )
        return cls(
            keys=keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=settings.jwt_algorithms,
            redis=redis,
            max_staleness_seconds=settings.revocation_max_staleness_seconds,
            max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
        )

    async def start(self) -> None:
        if isinstance(self.keys, JwksKeySource):
            self.keys.start()
        if self.redis is not None and self.revocations is None:
            self.revocations = RevocationMirror(self.redis)
            self.revocations.start()

    async def aclose(self) -> None:
        mirror, self.revocations = self.revocations, None
        if mirror is not None:
            await mirror.aclose()
        if isinstance(self.keys, JwksKeySource):
            await self.keys.aclose()
        # a revocation check given up on must not outlive the verifier: it would
        # open its connection after the app closed its Redis client
        await self._deadline.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def revocations_status(self) -> str:
        """One line for `/readyz`: "ok..." or how revocations are being answered."""
        mirror, redis = self.revocations, self.redis
        if redis is None or (mirror is not None and mirror.current()):
            return "ok"
        try:
            if mirror is not None and mirror.failing:
                raise ConnectionError("the revocation subscriber cannot reach Redis")
            await self._deadline.run(redis.ping)
        except (RedisError, OSError, TimeoutError):
            stale = math.inf if mirror is None else mirror.staleness()
            if stale <= self.max_staleness_seconds:
                return (
                    f"Redis unreachable: revocations answered from the mirror synced "
                    f"{stale:.0f} s ago (for up to {self.max_staleness_seconds:g} s)"
                )
            return "Redis unreachable and the mirror too old: authenticated requests get 503"
        return "ok: mirror resyncing, revocations asked of Redis per request"

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
        # a header is any JSON: a list or an object here must not reach the set lookup
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
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
        redis = self.redis
        # While the subscriber finds Redis down, it alone keeps trying: asking per
        # request too would add a connection attempt (and a name lookup that can
        # hang for seconds while the server is gone) to every request.
        redis_down = mirror is not None and mirror.failing
        if not redis_down and time.monotonic() >= self._redis_down_until:
            try:
                token_revoked, user_revoked_before = await self._deadline.run(
                    lambda: redis.mget(
                        revoked_token_key(principal.jti), revoked_user_key(principal.user_id)
                    )
                )
            except (RedisError, OSError, TimeoutError) as error:
                if not self._redis_failing:
                    self._redis_failing = True
                    logger.warning("revocation checks cannot reach Redis: %s", error)
                self._redis_down_until = time.monotonic() + REDIS_BACKOFF_SECONDS
            else:
                if self._redis_failing:
                    self._redis_failing = False
                    logger.info("revocation checks reach Redis again")
                if revoked_by(principal.issued_at, token_revoked, user_revoked_before):
                    raise Unauthenticated("Token revoked")
                return
        if mirror is not None and mirror.staleness() <= self.max_staleness_seconds:
            if mirror.refuses(principal.jti, principal.user_id, principal.issued_at):
                raise Unauthenticated("Token revoked")
            return
        raise ServiceUnavailable(
            "Token revocation list is unreachable; retry",
            headers={"Retry-After": str(math.ceil(REDIS_BACKOFF_SECONDS) + 1)},
        )


REVOCATION_BATCH = 500


class TokenIdentity(Protocol):
    """What revocation judges a token by (a `Principal`, or a socket holding one)."""

    @property
    def jti(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def issued_at(self) -> int: ...


async def revoked_among(redis: Redis, tokens: Sequence[TokenIdentity]) -> list[bool]:
    """Which of many tokens are revoked now, read from Redis in batches (the
    periodic re-check of long-lived sockets); raises RedisError or OSError when
    Redis cannot answer."""
    verdicts: list[bool] = []
    for start in range(0, len(tokens), REVOCATION_BATCH):
        batch = tokens[start : start + REVOCATION_BATCH]
        keys: list[str] = []
        for token in batch:
            keys += [revoked_token_key(token.jti), revoked_user_key(token.user_id)]
        markers = await redis.mget(keys)
        verdicts += [
            revoked_by(token.issued_at, markers[2 * index], markers[2 * index + 1])
            for index, token in enumerate(batch)
        ]
    return verdicts


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
        session_id=str(claims["sid"]) if claims.get("sid") is not None else None,
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
