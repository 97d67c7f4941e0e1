from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from jose import jwt
from redis.asyncio import Redis

import kit.security
from kit.errors import ServiceUnavailable, Unauthenticated
from kit.security import (
    KeySource,
    TokenVerifier,
    VerificationKey,
    revoke_token,
    revoke_user,
    revoked_token_key,
    revoked_user_key,
)
from kit.settings import DEFAULT_JWT_ISSUER
from kit.testing import Service, TokenMinter, wait_for_redis


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


async def test_redis_restart_falls_back_then_resyncs(
    minter: TokenMinter, mirrored: TokenVerifier, redis_service: Service, redis_url: str
) -> None:
    mirror = mirrored.revocations
    assert mirror is not None
    token = minter.token(user_id=str(uuid.uuid4()))
    principal = await mirrored.verify(token)
    syncs = mirror.syncs

    await asyncio.to_thread(redis_service.stop)
    try:
        await until(mirrored, lambda: not mirror.synced)
        # not synced: the per-request check runs, and Redis is down
        with pytest.raises(ServiceUnavailable):
            await mirrored.verify(token)
    finally:
        await asyncio.to_thread(redis_service.start)
    await wait_for_redis(redis_url)
    writer = Redis.from_url(redis_url)
    try:
        # written right after the restart, while the subscriber is still reconnecting
        await writer.set(revoked_token_key(principal.jti), "1", ex=60)
    finally:
        await writer.aclose()
    await until(mirrored, lambda: mirror.syncs > syncs and mirror.current())
    with pytest.raises(Unauthenticated, match="Token revoked"):
        await mirrored.verify(token)
    other = minter.token(user_id=principal.user_id)
    assert (await mirrored.verify(other)).user_id == principal.user_id
