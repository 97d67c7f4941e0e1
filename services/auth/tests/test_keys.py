"""The key ring: generated once across replicas, a configured secret, rotation, retirement."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from jose import jwk, jwt
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.config import Settings
from auth.keys import (
    KeyRetirementRefused,
    KeyRing,
    ensure_signing_key,
    generate_private_pem,
    public_pem_of,
    publish_lead,
    retire,
    rotate,
    thumbprint,
)
from auth.keys import main as keys_main
from auth.main import create_app
from auth.models import SigningKey
from kit.db import make_engine, make_sessionmaker
from kit.settings import DEFAULT_JWT_ISSUER
from kit_testing import free_port, started

from .conftest import SERVICE_DIR, fresh_database, make_settings, wait_until_ready
from .factories import login

Sessionmaker = async_sessionmaker[AsyncSession]


@pytest.fixture
async def ring_db(postgres_server_url: str) -> AsyncIterator[tuple[str, Sessionmaker]]:
    """A database of its own: rotation here must not disturb the shared app."""
    url = await fresh_database(postgres_server_url)
    engine = make_engine(url, pool_size=3, max_overflow=3)
    yield url, make_sessionmaker(engine)
    await engine.dispose()


async def kids(sessionmaker: Sessionmaker, *, retired: bool) -> list[str]:
    condition = SigningKey.retired_at.is_not(None) if retired else SigningKey.retired_at.is_(None)
    async with sessionmaker() as session:
        return list((await session.scalars(select(SigningKey.kid).where(condition))).all())


@pytest.fixture
async def app_client(
    ring_db: tuple[str, Sessionmaker], redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    overrides = getattr(request, "param", {})
    settings = make_settings(ring_db[0], redis_url, key_ring_refresh_seconds=0, **overrides)
    app = create_app(settings)
    async with (
        started(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://auth"
        ) as client,
    ):
        await wait_until_ready(client)
        yield client


async def test_replicas_starting_together_share_one_generated_key(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url)
    await asyncio.gather(*(ensure_signing_key(sessionmaker, settings) for _ in range(4)))
    (kid,) = await kids(sessionmaker, retired=False)
    await ensure_signing_key(sessionmaker, settings)  # a later restart keeps it
    assert await kids(sessionmaker, retired=False) == [kid]
    rings = [KeyRing(sessionmaker=sessionmaker, settings=settings) for _ in range(2)]
    for ring in rings:
        await ring.reload()
    assert {(await ring.active_key()).kid for ring in rings} == {kid}


async def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(
    app_client: httpx.AsyncClient, ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    before = await login(app_client, "root@example.com", "admin-password-1")
    old_kid = jwt.get_unverified_header(before.access)["kid"]
    settings = make_settings(url, redis_url)
    new_kid = await rotate(sessionmaker, settings)
    assert new_kid != old_kid
    # published to every replica by now (it signs from then on, whatever the
    # age of the ring's first key)
    await backdate(sessionmaker, new_kid, publish_lead(settings) + timedelta(seconds=1))
    after = await login(app_client, "root@example.com", "admin-password-1")
    assert jwt.get_unverified_header(after.access)["kid"] == new_kid
    published = {
        key["kid"] for key in (await app_client.get("/auth/.well-known/jwks.json")).json()["keys"]
    }
    assert published == {old_kid, new_kid}
    for tokens in (before, after):
        assert (await app_client.get("/auth/users/me", headers=tokens.headers)).status_code == 200


async def test_a_key_retired_longer_than_a_token_lifetime_leaves_the_jwks(
    app_client: httpx.AsyncClient, ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    before = await login(app_client, "root@example.com", "admin-password-1")
    old_kid = jwt.get_unverified_header(before.access)["kid"]
    new_kid = await rotate(sessionmaker, make_settings(url, redis_url))
    async with sessionmaker() as session:
        await session.execute(
            update(SigningKey)
            .where(SigningKey.kid == old_kid)
            .values(retired_at=datetime.now(UTC) - timedelta(hours=1))
        )
        await session.commit()
    jwks = (await app_client.get("/auth/.well-known/jwks.json")).json()
    assert [key["kid"] for key in jwks["keys"]] == [new_kid]
    refused = await app_client.get("/auth/users/me", headers=before.headers)
    assert refused.status_code == 401
    assert refused.json()["detail"] == "Token signed by an unknown key"


async def test_the_rotate_command(ring_db: tuple[str, Sessionmaker], redis_url: str) -> None:
    url, sessionmaker = ring_db
    await ensure_signing_key(sessionmaker, make_settings(url, redis_url))
    (old_kid,) = await kids(sessionmaker, retired=False)
    environment = {**os.environ, "DATABASE_URL": url}
    environment.pop("SIGNING_KEY", None)
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "auth.keys", "rotate"],
        cwd=SERVICE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    new_kid = completed.stdout.strip()
    assert await kids(sessionmaker, retired=False) == [new_kid]
    assert await kids(sessionmaker, retired=True) == [old_kid]


CONFIGURED_PEM = generate_private_pem()


@pytest.mark.parametrize("app_client", [{"signing_key": CONFIGURED_PEM}], indirect=True)
async def test_a_configured_key_signs_and_only_its_public_half_is_stored(
    app_client: httpx.AsyncClient, ring_db: tuple[str, Sessionmaker]
) -> None:
    _, sessionmaker = ring_db
    public_pem = public_pem_of(CONFIGURED_PEM)
    tokens = await login(app_client, "root@example.com", "admin-password-1")
    kid = jwt.get_unverified_header(tokens.access)["kid"]
    assert kid == thumbprint(public_pem)
    claims = jwt.decode(
        tokens.access, jwk.construct(public_pem, "ES256"), algorithms=["ES256"], audience="bazaar"
    )
    assert claims["iss"] == DEFAULT_JWT_ISSUER
    async with sessionmaker() as session:
        stored = await session.get(SigningKey, kid)
        count = await session.scalar(select(func.count()).select_from(SigningKey))
    assert stored is not None
    assert stored.private_pem is None
    assert stored.retired_at is None
    assert count == 1


def test_a_key_file_names_the_key_and_an_empty_one_names_none(tmp_path: Path) -> None:
    """Compose's setup step writes auth an empty key file when no key was
    given: auth then generates its own, as with none configured."""
    given, empty = tmp_path / "given.pem", tmp_path / "empty.pem"
    given.write_text(CONFIGURED_PEM + "\n")
    empty.write_text("")

    named = make_settings("postgresql+asyncpg://x/y", "redis://r", signing_key_file=given)
    none = make_settings("postgresql+asyncpg://x/y", "redis://r", signing_key_file=empty)
    assert named.signing_key_pem() == CONFIGURED_PEM.strip()
    assert none.signing_key_pem() is None


async def test_replacing_the_configured_key_keeps_the_old_one_published(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    first, second = generate_private_pem(), generate_private_pem()
    await ensure_signing_key(sessionmaker, make_settings(url, redis_url, signing_key=first))
    await ensure_signing_key(sessionmaker, make_settings(url, redis_url, signing_key=second))
    settings = make_settings(url, redis_url, signing_key=second)
    ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
    await ring.reload()
    assert (await ring.active_key()).kid == thumbprint(public_pem_of(second))
    published = {key["kid"] for key in (await ring.jwks())["keys"]}
    assert published == {thumbprint(public_pem_of(first)), thumbprint(public_pem_of(second))}
    with pytest.raises(RuntimeError, match="replacing the secret"):
        await rotate(sessionmaker, settings)


async def test_a_key_that_is_not_p256_is_refused_at_start_up(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    settings: Settings = make_settings(ring_db[0], redis_url, signing_key=p384)
    with pytest.raises(ValueError, match="P-256"):
        KeyRing(sessionmaker=ring_db[1], settings=settings)


async def test_keys_are_parsed_once_not_per_reload(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url)
    await ensure_signing_key(sessionmaker, settings)
    ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
    await ring.reload()
    active = await ring.active_key()
    first = await ring.key_for(active.kid)
    await ring.reload()
    assert await ring.key_for(active.kid) is first
    assert await ring.active_key() is active
    assert await ring.key_for("no-such-kid") is None


async def published_kids(client: httpx.AsyncClient) -> set[str]:
    return {key["kid"] for key in (await client.get("/auth/.well-known/jwks.json")).json()["keys"]}


async def test_retiring_a_rotated_out_key_unpublishes_it_and_refuses_its_tokens(
    app_client: httpx.AsyncClient, ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url)
    old = await login(app_client, "root@example.com", "admin-password-1")
    old_kid = jwt.get_unverified_header(old.access)["kid"]
    new_kid = await rotate(sessionmaker, settings)
    await backdate(sessionmaker, new_kid, publish_lead(settings) + timedelta(seconds=1))
    new = await login(app_client, "root@example.com", "admin-password-1")
    assert jwt.get_unverified_header(new.access)["kid"] == new_kid
    assert await published_kids(app_client) == {old_kid, new_kid}

    assert await retire(sessionmaker, settings, old_kid) is None

    assert await published_kids(app_client) == {new_kid}
    refused = await app_client.get("/auth/users/me", headers=old.headers)
    assert refused.status_code == 401
    assert refused.json()["detail"] == "Token signed by an unknown key"
    assert (await app_client.get("/auth/users/me", headers=new.headers)).status_code == 200


async def test_retiring_the_signing_key_rotates_first(
    app_client: httpx.AsyncClient,
    ring_db: tuple[str, Sessionmaker],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, sessionmaker = ring_db
    before = await login(app_client, "root@example.com", "admin-password-1")
    kid = jwt.get_unverified_header(before.access)["kid"]
    monkeypatch.setenv("DATABASE_URL", url)

    assert await keys_main(["retire", kid]) == 0

    (replacement,) = await kids(sessionmaker, retired=False)
    assert capsys.readouterr().out.endswith(f"; {replacement} signs now\n")
    assert await published_kids(app_client) == {replacement}
    assert (await app_client.get("/auth/users/me", headers=before.headers)).status_code == 401
    after = await login(app_client, "root@example.com", "admin-password-1")
    assert jwt.get_unverified_header(after.access)["kid"] == replacement
    assert await keys_main(["list"]) == 0
    (listed,) = capsys.readouterr().out.splitlines()
    assert listed.startswith(f"{replacement}\t")
    assert listed.endswith("\tsigning")


async def test_a_configured_or_unknown_key_cannot_be_retired(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url, signing_key=CONFIGURED_PEM)
    await ensure_signing_key(sessionmaker, settings)

    with pytest.raises(KeyRetirementRefused, match="this key is SIGNING_KEY"):
        await retire(sessionmaker, settings, thumbprint(public_pem_of(CONFIGURED_PEM)))
    with pytest.raises(KeyRetirementRefused, match="no key nope in the ring"):
        await retire(sessionmaker, settings, "nope")


async def test_with_the_database_away_a_failed_reload_is_not_tried_by_every_request(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    """The cached keys answer at once; the ring is tried again a refresh
    interval later, not once per verification, each waiting on the last."""
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url, key_ring_refresh_seconds=30)
    await ensure_signing_key(sessionmaker, settings)
    ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
    kid = (await ring.active_key()).kid
    away = make_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/auth")
    attempts = 0
    reload = ring.reload

    async def counted() -> None:
        nonlocal attempts
        attempts += 1
        await reload()

    ring.reload = counted  # type: ignore[method-assign]
    ring.sessionmaker = make_sessionmaker(away)
    ring._loaded_at -= 31  # the interval has passed: due for a reload
    ring._attempted_at = ring._loaded_at  # and so is the last attempt
    try:
        keys = await asyncio.gather(*(ring.key_for(kid) for _ in range(20)))
        again = await ring.key_for(kid)
    finally:
        await away.dispose()
    assert attempts == 1
    assert {key.kid for key in keys if key is not None} == {kid}
    assert len(keys) == 20
    assert again is not None


async def test_while_a_reload_is_under_way_the_cached_keys_answer_at_once(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    """A request holding a pooled connection must not wait for a reload that
    waits for one: with keys in hand, callers do not queue behind it."""
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url, key_ring_refresh_seconds=30)
    await ensure_signing_key(sessionmaker, settings)
    ring = KeyRing(sessionmaker=sessionmaker, settings=settings)
    kid = (await ring.active_key()).kid
    ring._loaded_at -= 31  # due for a reload...
    ring._attempted_at = ring._loaded_at
    async with ring._lock:  # ...which is under way, waiting for a connection
        async with asyncio.timeout(2):
            active = await ring.active_key()
            known = await ring.key_for(kid)
    assert active.kid == kid
    assert known is not None


async def backdate(sessionmaker: Sessionmaker, kid: str, by: timedelta) -> None:
    async with sessionmaker() as session:
        await session.execute(
            update(SigningKey)
            .where(SigningKey.kid == kid)
            .values(created_at=SigningKey.created_at - by)
        )
        await session.commit()


async def test_a_new_key_signs_only_once_every_replica_publishes_it(
    ring_db: tuple[str, Sessionmaker], redis_url: str
) -> None:
    """A replica re-reads the ring every refresh interval: until then its
    JWKS lacks a key another replica made, and a verifier that asked it
    would refuse that key's tokens with a 401. So a new key is published at
    once and signs a refresh interval (and a margin) later; the old one
    signs meanwhile."""
    url, sessionmaker = ring_db
    settings = make_settings(url, redis_url, key_ring_refresh_seconds=30)
    await ensure_signing_key(sessionmaker, settings)
    (old_kid,) = await kids(sessionmaker, retired=False)
    await backdate(sessionmaker, old_kid, timedelta(days=1))  # it has signed for a while
    stale, fresh = (KeyRing(sessionmaker=sessionmaker, settings=settings) for _ in range(2))
    assert (await stale.active_key()).kid == old_kid

    new_kid = await rotate(sessionmaker, settings)
    await fresh.reload()  # one replica has read the ring since, the other not yet

    assert (await fresh.active_key()).kid == old_kid
    assert {key["kid"] for key in (await fresh.jwks())["keys"]} == {old_kid, new_kid}
    assert {key["kid"] for key in (await stale.jwks())["keys"]} == {old_kid}
    # every replica has read the ring again, and the margin has passed
    await backdate(sessionmaker, new_kid, publish_lead(settings) + timedelta(seconds=1))
    for ring_ in (stale, fresh):
        await ring_.reload()
        assert (await ring_.active_key()).kid == new_kid
        assert {key["kid"] for key in (await ring_.jwks())["keys"]} == {old_kid, new_kid}
