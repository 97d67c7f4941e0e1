from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from jose import jwt
from redis.asyncio import Redis

import kit.security
from kit.errors import ServiceUnavailable, Unauthenticated
from kit.revocations import RevocationMirror
from kit.security import (
    Deadline,
    JwksKeySource,
    KeySource,
    TokenVerifier,
    VerificationKey,
    revoke_token,
    revoke_user,
    revoked_token_key,
    revoked_user_key,
    shared_jwks_key,
    user_revoked_before,
)
from kit.settings import DEFAULT_JWT_ISSUER
from kit_testing import JwksServer, Service, TokenMinter, free_port, serve, wait_for_redis


def make_verifier(keys: KeySource, redis: Redis | None) -> TokenVerifier:
    return TokenVerifier(
        keys=keys, issuer=DEFAULT_JWT_ISSUER, audience="bazaar", algorithms=["ES256"], redis=redis
    )


async def until(verifier: TokenVerifier, predicate: Callable[[], bool]) -> None:
    mirror = verifier.revocations
    assert mirror is not None
    async with asyncio.timeout(15):
        await mirror.wait_for(predicate)


async def current(verifier: TokenVerifier) -> None:
    mirror = verifier.revocations
    assert mirror is not None
    await until(verifier, mirror.current)


@pytest.fixture
def minter() -> TokenMinter:
    return TokenMinter()


@pytest.fixture
async def mirrored(minter: TokenMinter, redis_url: str) -> AsyncIterator[TokenVerifier]:
    client = Redis.from_url(redis_url)
    verifier = make_verifier(minter.key_source, client)
    try:
        async with verifier:
            await current(verifier)
            yield verifier
    finally:
        await client.aclose()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


class SwappableKeys:
    """A key source whose key for a kid can be replaced, as a JWKS refresh does."""

    def __init__(self, keys: dict[str, VerificationKey]) -> None:
        self.keys = keys

    async def key_for(self, kid: str) -> VerificationKey | None:
        return self.keys.get(kid)


# --- the verified-token cache -------------------------------------------------------


async def test_cache_hit_still_refuses_an_expired_token(
    minter: TokenMinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = make_verifier(minter.key_source, None)
    token = minter.token(user_id="u-1", lifetime=60)
    assert (await verifier.verify(token)).user_id == "u-1"
    assert (await verifier.verify(token)).user_id == "u-1"  # a cache hit

    await verifier.verify(other := minter.token(user_id="u-2", lifetime=60))

    # the hits are checked against the cache's clock (jose's own clock still says valid)
    monkeypatch.setattr(kit.security, "_now", lambda: time.time() + 61)
    with pytest.raises(Unauthenticated, match="Token expired"):
        await verifier.verify(token)
    with pytest.raises(Unauthenticated, match="Token expired"):
        await verifier.verified_claims(other)


async def test_cached_token_is_verified_afresh_when_its_key_changes(minter: TokenMinter) -> None:
    genuine = await minter.key_source.key_for(minter.kid)
    assert genuine is not None
    keys = SwappableKeys({minter.kid: genuine})
    verifier = make_verifier(keys, None)
    token = minter.token(user_id="u-2")
    assert (await verifier.verify(token)).user_id == "u-2"

    other = await TokenMinter().key_source.key_for(TokenMinter().kid)
    impostor = TokenMinter()
    impostor_key = await impostor.key_source.key_for(impostor.kid)
    assert other is None
    assert impostor_key is not None
    keys.keys[minter.kid] = VerificationKey(minter.kid, "ES256", impostor_key.key)
    with pytest.raises(Unauthenticated, match="Invalid token"):
        await verifier.verify(token)
    del keys.keys[minter.kid]
    with pytest.raises(Unauthenticated, match="unknown key"):
        await verifier.verify(token)


async def test_cache_is_bounded_and_claims_are_copies(minter: TokenMinter) -> None:
    verifier = TokenVerifier(
        keys=minter.key_source,
        issuer=DEFAULT_JWT_ISSUER,
        audience="bazaar",
        algorithms=["ES256"],
        redis=None,
        max_cached_tokens=2,
    )
    tokens = [minter.token(user_id=f"u-{index}") for index in range(3)]
    for token in tokens:
        await verifier.verify(token)
    for index, token in enumerate(tokens):
        assert (await verifier.verify(token)).user_id == f"u-{index}"
    claims = await verifier.verified_claims(tokens[0])
    claims["sub"] = "someone else"
    assert (await verifier.verified_claims(tokens[0]))["sub"] == "u-0"


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ("alg_none", "algorithm is not allowed"),
        ("alg_list", "algorithm is not allowed"),
        ("alg_object", "algorithm is not allowed"),
        ("hs256_with_public_key", "algorithm is not allowed"),
        ("unknown_kid", "unknown key"),
        ("tampered_payload", "Invalid token"),
        ("no_kid", "no key id"),
        ("refresh_typ", "Not an access token"),
        ("wrong_audience", "claims are invalid"),
        ("expired", "Token expired"),
        ("garbage", "Malformed token"),
    ],
)
async def test_forged_tokens_are_refused_even_after_a_genuine_one_is_cached(
    minter: TokenMinter, attack: str, message: str
) -> None:
    verifier = make_verifier(minter.key_source, None)
    genuine = minter.token(user_id="victim")
    await verifier.verify(genuine)
    claims = {**jwt.get_unverified_claims(genuine), "roles": ["admin"]}
    header = {"alg": "ES256", "kid": minter.kid, "typ": "JWT"}
    if attack == "alg_none":
        token = forged({**header, "alg": "none"}, claims, lambda _: b"")
    elif attack == "alg_list":  # a header is any JSON: an unhashable alg, not a 500
        token = forged({**header, "alg": ["ES256"]}, claims, lambda _: b"")
    elif attack == "alg_object":
        token = forged({**header, "alg": {"ES256": True}}, claims, lambda _: b"")
    elif attack == "hs256_with_public_key":
        secret = minter.public_pem.encode()
        token = forged(
            {**header, "alg": "HS256"},
            claims,
            lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
        )
    elif attack == "unknown_kid":
        token = TokenMinter().token(user_id="victim", roles=("admin",))
    elif attack == "tampered_payload":
        head, _, signature = genuine.split(".")
        token = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
    elif attack == "no_kid":
        token = jwt.encode(claims, minter.private_pem, algorithm="ES256")
    elif attack == "refresh_typ":
        token = minter.token(user_id="victim", typ="refresh")
    elif attack == "wrong_audience":
        token = minter.token(user_id="victim", aud="elsewhere")
    elif attack == "expired":
        token = minter.token(user_id="victim", lifetime=-120)
    else:
        token = "not.a.token"
    for _ in range(2):  # refusals are never cached, nor turned into acceptance
        with pytest.raises(Unauthenticated, match=message):
            await verifier.verify(token)


# --- revocation ------------------------------------------------------------------------


async def test_without_a_started_mirror_revocation_is_asked_of_redis(
    minter: TokenMinter, redis: Redis
) -> None:
    verifier = make_verifier(minter.key_source, redis)
    token = minter.token(user_id=str(uuid.uuid4()))
    principal = await verifier.verify(token)
    await redis.set(revoked_token_key(principal.jti), "1", ex=60)
    with pytest.raises(Unauthenticated, match="Token revoked"):
        await verifier.verify(token)


async def test_revocation_reaches_another_verifier_through_pubsub(
    minter: TokenMinter, mirrored: TokenVerifier, redis_url: str
) -> None:
    writer_redis = Redis.from_url(redis_url)
    try:
        async with make_verifier(minter.key_source, writer_redis) as writer:
            await current(writer)
            token = minter.token(user_id=str(uuid.uuid4()))
            principal = await mirrored.verify(token)
            assert await writer.verify(token) == principal

            await revoke_token(writer_redis, principal.jti, ttl=60)
            # the writing process refuses at once, before anything else runs
            with pytest.raises(Unauthenticated, match="Token revoked"):
                await writer.verify(token)
            reader = mirrored.revocations
            assert reader is not None
            await until(
                mirrored,
                lambda: reader.refuses(principal.jti, principal.user_id, principal.issued_at),
            )
            assert reader.current()  # answered by the mirror, not by a Redis round trip
            with pytest.raises(Unauthenticated, match="Token revoked"):
                await mirrored.verify(token)
    finally:
        await writer_redis.aclose()


async def test_user_revocation_by_any_writer_reaches_mirrors(
    minter: TokenMinter, mirrored: TokenVerifier, redis: Redis
) -> None:
    user_id = str(uuid.uuid4())
    old = minter.token(user_id=user_id, iat=int(time.time()) - 30)
    assert (await mirrored.verify(old)).user_id == user_id
    # a plain SET, as an operator would do: no publish step is needed
    await redis.set(revoked_user_key(user_id), repr(time.time() - 10), ex=60)
    reader = mirrored.revocations
    assert reader is not None
    await until(mirrored, lambda: reader.refuses("-", user_id, int(time.time()) - 30))
    with pytest.raises(Unauthenticated, match="Token revoked"):
        await mirrored.verify(old)
    fresh = minter.token(user_id=user_id)
    assert (await mirrored.verify(fresh)).user_id == user_id

    await redis.delete(revoked_user_key(user_id))
    await until(mirrored, lambda: not reader.refuses("-", user_id, int(time.time()) - 30))
    assert (await mirrored.verify(old)).user_id == user_id


async def test_revoke_user_applies_locally_at_once(
    minter: TokenMinter, mirrored: TokenVerifier
) -> None:
    user_id = str(uuid.uuid4())
    token = minter.token(user_id=user_id, iat=int(time.time()) - 5)
    await mirrored.verify(token)
    assert mirrored.redis is not None
    await revoke_user(mirrored.redis, user_id, before=time.time(), ttl=60)
    with pytest.raises(Unauthenticated, match="Token revoked"):
        await mirrored.verify(token)


async def test_resync_on_start_catches_revocations_written_before(
    minter: TokenMinter, redis: Redis, redis_url: str
) -> None:
    token = minter.token(user_id=str(uuid.uuid4()))
    jti = jwt.get_unverified_claims(token)["jti"]
    await redis.set(revoked_token_key(jti), "1", ex=60)
    client = Redis.from_url(redis_url)
    try:
        async with make_verifier(minter.key_source, client) as verifier:
            await current(verifier)
            with pytest.raises(Unauthenticated, match="Token revoked"):
                await verifier.verify(token)
    finally:
        await client.aclose()


async def test_redis_down_answers_from_the_mirror_for_a_bounded_time_then_fails_closed(
    minter: TokenMinter, redis_service: Service, redis_url: str
) -> None:
    client = Redis.from_url(redis_url)
    verifier = TokenVerifier(
        keys=minter.key_source,
        issuer=DEFAULT_JWT_ISSUER,
        audience="bazaar",
        algorithms=["ES256"],
        redis=client,
        max_staleness_seconds=60,
    )
    try:
        async with verifier:
            await current(verifier)
            mirror = verifier.revocations
            assert mirror is not None
            revoked = minter.token(user_id=str(uuid.uuid4()))
            await revoke_token(client, (await verifier.verify(revoked)).jti, ttl=60)
            valid = minter.token(user_id=str(uuid.uuid4()))
            principal = await verifier.verify(valid)
            logged_out, cutoff = str(uuid.uuid4()), time.time()
            await revoke_user(client, logged_out, before=cutoff, ttl=60)
            assert await user_revoked_before(client, logged_out) == cutoff
            syncs = mirror.syncs

            await asyncio.to_thread(redis_service.stop)
            try:
                await until(verifier, lambda: not mirror.synced)
                # Redis cannot be asked: the mirror's last sync answers, both ways
                assert await verifier.verify(valid) == principal
                with pytest.raises(Unauthenticated, match="Token revoked"):
                    await verifier.verify(revoked)
                assert (await verifier.revocations_status()).startswith(
                    "Redis unreachable: revocations answered from the mirror synced"
                )
                # what a login reads to date a new token after a logout-everywhere
                assert await user_revoked_before(client, logged_out) == cutoff
                assert await user_revoked_before(client, principal.user_id) is None
                # past the bound, authenticated requests fail closed with a retry hint
                verifier.max_staleness_seconds = 0
                with pytest.raises(ServiceUnavailable) as refused:
                    await verifier.verify(valid)
                assert refused.value.headers["Retry-After"] == "2"
                assert "too old" in await verifier.revocations_status()
            finally:
                await asyncio.to_thread(redis_service.start)
            await wait_for_redis(redis_url)
            writer = Redis.from_url(redis_url)
            try:
                # written right after the restart, while the subscriber is still reconnecting
                await writer.set(revoked_token_key(principal.jti), "1", ex=60)
            finally:
                await writer.aclose()
            await until(verifier, lambda: mirror.syncs > syncs and mirror.current())
            assert await verifier.revocations_status() == "ok"
            with pytest.raises(Unauthenticated, match="Token revoked"):
                await verifier.verify(valid)
            other = minter.token(user_id=principal.user_id)
            assert (await verifier.verify(other)).user_id == principal.user_id
    finally:
        await client.aclose()


async def test_a_frozen_redis_costs_a_bounded_wait_then_the_mirror_answers(
    minter: TokenMinter, mirrored: TokenVerifier, redis_service: Service
) -> None:
    mirror = mirrored.revocations
    assert mirror is not None
    token = minter.token(user_id=str(uuid.uuid4()))
    principal = await mirrored.verify(token)
    container = redis_service.container.get_wrapped_container()
    await pause(container)
    try:
        await poll(lambda: not mirror.current())  # no PONG within the lease
        # the client has no socket timeout of its own: the verifier bounds the wait
        async with asyncio.timeout(5):
            assert await mirrored.verify(token) == principal
            assert await mirrored.verify(minter.token(user_id="u-9")) is not None
    finally:
        await asyncio.to_thread(container.unpause)
    await current(mirrored)


async def pause(container: Any) -> None:
    """Freezes the container; the engine sometimes fails to freeze one just
    restarted ("unable to freeze"), which a second attempt gets past."""
    deadline = time.monotonic() + 15
    while True:
        try:
            await asyncio.to_thread(container.pause)
            return
        except Exception:  # docker's APIError, which says why
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)  # before the next attempt


async def poll(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Waits for `predicate()` to hold, checking every few milliseconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.02)


# --- the key source -----------------------------------------------------------------


def jwks_of(*minters: TokenMinter) -> dict[str, Any]:
    return {"keys": [key for minter in minters for key in minter.jwks["keys"]]}


@contextlib.asynccontextmanager
async def key_source(url: str, **options: Any) -> AsyncIterator[JwksKeySource]:
    """A started key source for `url`, with short retry delays."""
    options.setdefault("retry_seconds", (0.05, 0.2))
    async with httpx.AsyncClient() as http:
        source = JwksKeySource(url, http=http, algorithms=["ES256"], **options)
        source.start()
        try:
            yield source
        finally:
            await source.aclose()


def jwks_app(server: JwksServer) -> contextlib.AbstractAsyncContextManager[str]:
    return serve(server, port=server_port(server), lifespan="off")


_ports: dict[int, int] = {}


def server_port(server: JwksServer) -> int:
    """One port per server, so a server stopped and started again keeps its URL."""
    return _ports.setdefault(id(server), free_port())


async def test_keys_load_at_start_and_a_key_auth_stops_publishing_is_refused_within_max_age(
    minter: TokenMinter,
) -> None:
    retired = TokenMinter()
    server = JwksServer(jwks_of(retired, minter), cache_control="public, max-age=1")
    async with (
        jwks_app(server) as base,
        key_source(f"{base}/jwks", refresh_seconds=60, min_refresh_seconds=0.2) as source,
    ):
        await poll(lambda: source.answered)  # loaded before any token asked for it
        assert source.kids == {retired.kid, minter.kid}
        assert source.refresh_interval == 1.0  # max-age, shorter than the setting, wins
        verifier = make_verifier(source, None)
        token = retired.token(user_id="u-1")
        assert (await verifier.verify(token)).user_id == "u-1"

        server.document = jwks_of(minter)  # auth retires the key
        await poll(lambda: source.kids == {minter.kid})  # on schedule, nobody asked
        with pytest.raises(Unauthenticated, match="unknown key"):
            await verifier.verify(token)  # even though it was verified (and cached) before
        assert (await verifier.verify(minter.token(user_id="u-2"))).user_id == "u-2"


@pytest.mark.parametrize(
    ("cache_control", "interval"),
    [("public, max-age=60", 30.0), ("max-age=10", 10.0), ("no-store", 5.0), ("private", 30.0)],
)
async def test_the_refresh_interval_is_max_age_bounded_by_the_setting_and_the_minimum(
    minter: TokenMinter, cache_control: str, interval: float
) -> None:
    server = JwksServer(jwks_of(minter), cache_control=cache_control)
    async with serve(server, lifespan="off") as base, httpx.AsyncClient() as http:
        source = JwksKeySource(
            f"{base}/jwks",
            http=http,
            algorithms=["ES256"],
            refresh_seconds=30,
            min_refresh_seconds=5,
        )
        assert await source.refresh()
    assert source.refresh_interval == interval


async def test_auth_unreachable_keeps_the_keys_and_an_unknown_kid_is_a_503_not_a_401(
    minter: TokenMinter,
) -> None:
    stranger = TokenMinter()
    server = JwksServer(jwks_of(minter))
    port = server_port(server)
    async with key_source(f"http://127.0.0.1:{port}/jwks", min_refresh_seconds=0.1) as source:
        verifier = make_verifier(source, None)
        async with jwks_app(server):
            await poll(lambda: source.answered)
            await verifier.verify(minter.token())
            # an auth replica that answers 503 cannot say which keys exist either
            server.failing = True
            assert not await source.refresh()
            with pytest.raises(ServiceUnavailable, match="cannot be fetched"):
                await verifier.verify(stranger.token())
            # still failing while it stops: a background retry that found it well
            # again would leave the source content until the next failure

        # auth stopped: connections are refused
        await poll(lambda: not source.answered)
        fresh = minter.token(user_id="fresh")  # never verified before: its key is cached
        assert (await verifier.verify(fresh)).user_id == "fresh"
        with pytest.raises(ServiceUnavailable) as refused:
            await verifier.verify(stranger.token())
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert source.describe().startswith("auth unreachable for")
        assert "using 1 cached key(s)" in source.describe()

        server.failing = False
        async with jwks_app(server):
            await poll(lambda: source.answered)  # the background retry
            with pytest.raises(Unauthenticated, match="unknown key"):
                await verifier.verify(stranger.token())
            assert source.describe().startswith("ok: 1 key(s)")


async def test_unknown_kids_share_one_fetch_per_interval(minter: TokenMinter) -> None:
    server = JwksServer(jwks_of(minter))
    strangers = [TokenMinter() for _ in range(3)]
    async with serve(server, lifespan="off") as base, httpx.AsyncClient() as http:
        source = JwksKeySource(
            f"{base}/jwks", http=http, algorithms=["ES256"], min_refresh_seconds=60
        )
        found = await asyncio.gather(*(source.key_for(m.kid) for m in strangers * 10))
        assert found == [None] * 30
        assert await source.key_for(strangers[0].kid) is None
        assert server.hits == 1

        rotated = TokenMinter()
        server.document = jwks_of(minter, rotated)
        eager = JwksKeySource(
            f"{base}/jwks", http=http, algorithms=["ES256"], min_refresh_seconds=0
        )
        assert await eager.key_for(minter.kid) is not None
        assert await eager.key_for(rotated.kid) is not None  # a new kid: fetched again at once


async def test_a_verifier_started_while_auth_is_down_uses_the_key_set_shared_in_redis(
    minter: TokenMinter, redis: Redis
) -> None:
    server = JwksServer(jwks_of(minter))
    port = server_port(server)
    url = f"http://127.0.0.1:{port}/jwks/{uuid.uuid4().hex}"
    try:
        async with jwks_app(server), key_source(url, redis=redis) as first:
            await poll(lambda: first.answered)
        assert await redis.exists(shared_jwks_key(url))

        # auth is down now: a new replica starts
        async with key_source(url, redis=redis, min_refresh_seconds=0.1) as started_late:
            await poll(lambda: started_late.kids == {minter.kid})
            assert not started_late.answered
            verifier = make_verifier(started_late, None)
            assert (await verifier.verify(minter.token(user_id="u-3"))).user_id == "u-3"
            with pytest.raises(ServiceUnavailable):
                await verifier.verify(TokenMinter().token())

            # auth's own answer, once it is back, always wins over the copy
            successor = TokenMinter()
            server.document = jwks_of(successor)
            async with jwks_app(server):
                await poll(lambda: started_late.answered)
                assert started_late.kids == {successor.kid}
                with pytest.raises(Unauthenticated, match="unknown key"):
                    await verifier.verify(minter.token())
    finally:
        await redis.delete(shared_jwks_key(url))


async def test_a_deadline_gives_up_on_a_slow_call_without_cancelling_it() -> None:
    deadline = Deadline(0.05)
    release = asyncio.Event()
    finished: list[str] = []

    async def slow() -> str:
        await release.wait()
        finished.append("slow")
        return "late"

    async def quick() -> str:
        return "now"

    with pytest.raises(TimeoutError, match="did not answer"):
        await deadline.run(slow)
    # while the first call still runs, Redis counts as unresponsive: no second call
    with pytest.raises(TimeoutError, match="has not finished"):
        await deadline.run(quick)
    release.set()
    await poll(lambda: finished == ["slow"])  # it was left to finish, not cancelled
    assert await deadline.run(quick) == "now"


async def test_closing_a_deadline_ends_the_calls_it_gave_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kit.security, "STRAGGLER_GRACE_SECONDS", 0.05)
    deadline = Deadline(0.01)
    finishing, frozen = asyncio.Event(), asyncio.Event()
    ended: list[str] = []

    async def slow(name: str, until: asyncio.Event) -> str:
        try:
            await until.wait()
        except asyncio.CancelledError:
            ended.append(f"{name} cancelled")
            raise
        ended.append(f"{name} finished")
        return name

    # two callers at once: both calls are given up on and both are ended
    results = await asyncio.gather(
        deadline.run(lambda: slow("finishing", finishing)),
        deadline.run(lambda: slow("frozen", frozen)),
        return_exceptions=True,
    )
    assert all(isinstance(result, TimeoutError) for result in results)
    asyncio.get_running_loop().call_later(0.01, finishing.set)  # within the grace

    await deadline.aclose()

    assert sorted(ended) == ["finishing finished", "frozen cancelled"]
    assert await deadline.run(lambda: slow("next", finishing)) == "next"


async def test_a_revocation_this_process_applies_while_the_mirror_resyncs_is_kept(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync rebuilds the mirror from a SCAN; a token this process revoked
    after the SCAN went past its key (a logout during a reconnection) must
    not be lost when the scanned sets replace the old ones."""
    client = Redis.from_url(redis_url)
    mirror = RevocationMirror(client)
    jti = uuid.uuid4().hex
    scan_iter = client.scan_iter

    async def revoked_during_the_scan(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for key in scan_iter(*args, **kwargs):
            yield key
        mirror.apply(revoked_token_key(jti), "1")

    monkeypatch.setattr(client, "scan_iter", revoked_during_the_scan)
    try:
        await mirror._resync()
    finally:
        await client.aclose()
    assert mirror.refuses(jti, "someone", 0)


async def test_a_cutoff_this_process_applies_while_its_key_is_read_again_is_kept(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event makes the mirror read a user's cutoff again; a newer cutoff
    this process writes while that GET is on its way must win over it."""
    client = Redis.from_url(redis_url)
    mirror = RevocationMirror(client)
    key = revoked_user_key(f"u-{uuid.uuid4().hex}")
    get = client.get

    async def newer_written_meanwhile(name: str) -> Any:
        answer = await get(name)
        mirror.apply(key, "2000000000.0")  # after Redis answered, before the mirror reads it
        return answer

    await client.set(key, "1000000000.0", ex=60)
    monkeypatch.setattr(client, "get", newer_written_meanwhile)
    try:
        await mirror._reread(key)
    finally:
        await client.aclose()
    assert mirror.refuses("any", key.rsplit(":", 1)[1], 1_999_999_999)


async def test_a_revocation_written_during_the_scan_is_held_before_the_mirror_is_current(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer revokes a token after the resync's SCAN went past its
    key: the SCAN misses it, its event waits on the subscriber's connection.
    Until that event is applied (a PONG proves it), the mirror is not current,
    so a verifier asks Redis; and it counts as stale from the SCAN's start."""
    client = Redis.from_url(redis_url)
    mirror = RevocationMirror(client, heartbeat_seconds=0.2, lease_seconds=2.0)
    jti = uuid.uuid4().hex
    scan_iter, listen = client.scan_iter, mirror._listen
    seen: list[tuple[bool, bool, bool]] = []
    scanned_at: list[float] = []

    async def revoked_by_another_writer_meanwhile(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        scanned_at.append(time.monotonic())
        keys = [key async for key in scan_iter(*args, **kwargs)]
        await redis.set(revoked_token_key(jti), "1", ex=60)
        for key in keys:
            yield key

    async def listening(pubsub: Any) -> None:
        # the moment the rebuilt mirror takes over, before any event is read
        since_scan = time.monotonic() - scanned_at[-1]
        stale = mirror.staleness()
        seen.append((mirror.current(), mirror.refuses(jti, "someone", 0), stale >= since_scan))
        await listen(pubsub)

    monkeypatch.setattr(client, "scan_iter", revoked_by_another_writer_meanwhile)
    monkeypatch.setattr(mirror, "_listen", listening)
    mirror.start()
    try:
        async with asyncio.timeout(15):
            await mirror.wait_for(mirror.current)
        assert mirror.refuses(jti, "someone", 0)
    finally:
        await mirror.aclose()
        await client.aclose()
    ((was_current, refused, stale_since_the_scan),) = seen
    assert not refused  # the SCAN missed it...
    assert not was_current  # ...so the mirror did not answer alone
    assert stale_since_the_scan
