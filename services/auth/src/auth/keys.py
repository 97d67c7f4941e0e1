"""The signing-key ring: which ES256 key signs, which public keys verify.

Without a configured secret, the first replica to start generates a key and
stores it in the database under an advisory lock, so every replica signs with
the same one. A configured key is recorded by its public half only, so after
the secret is replaced its tokens still verify until they expire.

Rotate with `python -m auth.keys rotate` (DATABASE_URL set): a new key is
published at once and signs once every replica publishes it, the replicas'
key-ring refresh interval plus `PUBLISH_MARGIN_SECONDS` later (`publish_lead`);
the old one signs until then, and stays in the JWKS for one access-token
lifetime after. Signing with a key some replica does not publish yet would
have a verifier that asks that replica refuse the token with a 401, and its
user logged out.

Retire a key that must no longer be trusted (leaked, say) with `python -m
auth.keys retire <kid>`: it leaves the ring and the JWKS at once (a new key
signs first if it was the signing one), so every token it signed is refused
as soon as each verifier has refreshed its key set. `python -m auth.keys list`
shows the ring.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk
from jose.backends.base import Key
from sqlalchemy import delete, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.config import Settings
from auth.models import SigningKey
from kit.db import make_engine, make_sessionmaker
from kit.errors import ServiceUnavailable
from kit.security import VerificationKey

logger = logging.getLogger("auth.keys")

ALGORITHM = "ES256"
# pg_advisory_xact_lock id serialising key creation across replicas ("authkey")
_KEY_LOCK_ID = 0x617574686B6579
# an unknown kid triggers a re-read at most this often
_UNKNOWN_KID_REFRESH_SECONDS = 5.0
_CLOCK_LEEWAY = timedelta(seconds=60)
PUBLISH_MARGIN_SECONDS = 5.0
"""How long past the key-ring refresh interval a new key waits to sign: at
least the shortest interval at which a verifier fetches the JWKS again for an
unknown kid (kit's `min_refresh_seconds`), so none has last fetched it before
the key was published everywhere."""


@dataclass(frozen=True, slots=True)
class ActiveKey:
    kid: str
    private_key: Key


def generate_private_pem() -> str:
    private = ec.generate_private_key(ec.SECP256R1())
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem_of(private_pem: str) -> str:
    private = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError("The signing key must be an EC P-256 private key (ES256)")
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(public_pem: str) -> dict[str, Any]:
    fields: dict[str, Any] = jwk.construct(public_pem, ALGORITHM).to_dict()
    return fields


def thumbprint(public_pem: str) -> str:
    """RFC 7638 thumbprint: the same key gets the same `kid` on every replica."""
    fields = public_jwk(public_pem)
    canonical = json.dumps(
        {name: fields[name] for name in ("crv", "kty", "x", "y")},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def publish_lead(settings: Settings) -> timedelta:
    """How long a new key is published before it signs."""
    return timedelta(seconds=settings.key_ring_refresh_seconds + PUBLISH_MARGIN_SECONDS)


def retention(settings: Settings) -> timedelta:
    """How long a retired key stays published: until every token it signed
    expired (it signs for `publish_lead` after it was retired by a rotation,
    on a replica whose ring is a refresh interval old)."""
    return (
        timedelta(seconds=settings.access_token_ttl_seconds + settings.key_ring_refresh_seconds)
        + publish_lead(settings)
        + _CLOCK_LEEWAY
    )


def signing_row(rows: Sequence[SigningKey], *, now: datetime, lead: timedelta) -> SigningKey | None:
    """The key that signs at `now`, of `rows` newest first: the newest one
    published `lead` ago already (a key retired by a rotation signs until its
    successor is), else the newest one not retired (the first key of the
    ring, or the replacement of a key retired at once)."""
    usable = [row for row in rows if row.private_pem is not None]
    published = next(
        (
            row
            for row in usable
            if row.created_at <= now - lead
            and (row.retired_at is None or row.retired_at > now - lead)
        ),
        None,
    )
    return published or next((row for row in usable if row.retired_at is None), None)


async def _lock_ring(session: AsyncSession) -> None:
    await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _KEY_LOCK_ID})


async def _retire_all_except(session: AsyncSession, kid: str | None) -> None:
    statement = update(SigningKey).where(SigningKey.retired_at.is_(None))
    if kid is not None:
        statement = statement.where(SigningKey.kid != kid)
    await session.execute(statement.values(retired_at=datetime.now(UTC)))


async def _insert_generated(session: AsyncSession) -> str:
    private_pem = generate_private_pem()
    public_pem = public_pem_of(private_pem)
    kid = uuid.uuid4().hex
    session.add(
        SigningKey(kid=kid, algorithm=ALGORITHM, public_pem=public_pem, private_pem=private_pem)
    )
    return kid


async def ensure_signing_key(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Makes the ring hold exactly one unretired key: the configured one, or a stored one."""
    configured = settings.signing_key_pem()
    async with sessionmaker() as session, session.begin():
        await _lock_ring(session)
        if configured is not None:
            public_pem = public_pem_of(configured)
            kid = thumbprint(public_pem)
            known = await session.get(SigningKey, kid)
            if known is None:
                session.add(SigningKey(kid=kid, algorithm=ALGORITHM, public_pem=public_pem))
            elif known.retired_at is not None:
                known.retired_at = None
            await session.flush()
            await _retire_all_except(session, kid)
            return
        current = await session.scalar(
            select(SigningKey)
            .where(SigningKey.retired_at.is_(None), SigningKey.private_pem.is_not(None))
            .order_by(SigningKey.created_at.desc())
            .limit(1)
        )
        kid = current.kid if current is not None else await _insert_generated(session)
        await session.flush()
        # a key once supplied as a secret, no longer configured, stops signing
        await _retire_all_except(session, kid)


async def rotate(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> str:
    """Retires the signing key, stores a new one, drops keys past retention; returns the kid."""
    if settings.signing_key_pem() is not None:
        raise RuntimeError("The signing key comes from a secret: rotate by replacing the secret")
    async with sessionmaker() as session, session.begin():
        await _lock_ring(session)
        await _retire_all_except(session, None)
        kid = await _insert_generated(session)
        cutoff = datetime.now(UTC) - retention(settings)
        await session.execute(delete(SigningKey).where(SigningKey.retired_at < cutoff))
    logger.info("rotated signing key; %s now signs", kid)
    return kid


class KeyRetirementRefused(Exception):
    """The key cannot be retired this way; the message says why."""


async def retire(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, kid: str
) -> str | None:
    """Removes `kid` from the ring, so it is published no more; returns the kid
    of the key that signs now if `kid` was signing (it rotates first)."""
    configured = settings.signing_key_pem()
    if configured is not None and thumbprint(public_pem_of(configured)) == kid:
        raise KeyRetirementRefused(
            "this key is SIGNING_KEY: replace the secret on every auth replica, then retire it"
        )
    async with sessionmaker() as session, session.begin():
        await _lock_ring(session)
        key = await session.get(SigningKey, kid)
        if key is None:
            raise KeyRetirementRefused(f"no key {kid} in the ring")
        signing = key.retired_at is None and configured is None
        replacement = None
        if signing:
            await _retire_all_except(session, None)
            replacement = await _insert_generated(session)
        await session.delete(key)
    logger.warning("retired signing key %s; verifiers refuse its tokens once they refresh", kid)
    return replacement


async def ring(sessionmaker: async_sessionmaker[AsyncSession]) -> list[SigningKey]:
    async with sessionmaker() as session:
        return list(
            (await session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc()))).all()
        )


class KeyRing:
    """Auth's own key source: the kit verifier reads keys here, not over HTTP.

    The ring is re-read from the database when older than
    `key_ring_refresh_seconds`, so a rotation on another replica arrives.
    """

    def __init__(
        self, *, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        configured = settings.signing_key_pem()
        self._configured: ActiveKey | None = None
        if configured is not None:
            kid = thumbprint(public_pem_of(configured))
            self._configured = ActiveKey(kid, jwk.construct(configured, ALGORITHM))
        self._active: ActiveKey | None = None
        self._public: dict[str, VerificationKey] = {}
        self._jwks: dict[str, Any] = {"keys": []}
        self._loaded_at = float("-inf")
        self._attempted_at = float("-inf")  # the last reload tried, loaded or not
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._active is not None

    async def reload(self) -> None:
        cutoff = datetime.now(UTC) - retention(self.settings)
        async with self.sessionmaker() as session:
            rows = (
                await session.scalars(
                    select(SigningKey)
                    .where(or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > cutoff))
                    .order_by(SigningKey.created_at.desc())
                )
            ).all()
        active = self._configured
        if active is None:
            current = signing_row(rows, now=datetime.now(UTC), lead=publish_lead(self.settings))
            if current is not None and current.private_pem is not None:
                reuse = self._active is not None and self._active.kid == current.kid
                active = (
                    self._active
                    if reuse
                    else ActiveKey(current.kid, jwk.construct(current.private_pem, ALGORITHM))
                )
        public = {
            row.kid: self._public.get(row.kid)
            or VerificationKey(row.kid, row.algorithm, jwk.construct(row.public_pem, row.algorithm))
            for row in rows
        }
        self._jwks = {
            "keys": [
                {**public_jwk(row.public_pem), "kid": row.kid, "alg": row.algorithm, "use": "sig"}
                for row in rows
            ]
        }
        self._public, self._active = public, active
        self._loaded_at = time.monotonic()

    async def _refresh(self, *, older_than: float) -> None:
        """Re-reads the ring if older than `older_than` seconds. With keys in
        hand, a failed reload is tried again only `older_than` later: while
        the database is away, every verification in auth would otherwise
        queue behind one reload after another (each up to the connect
        timeout), where the cached keys answer at once."""
        now = time.monotonic()
        if now - self._loaded_at < older_than or now - self._attempted_at < older_than:
            return
        if (
            self._lock.locked()
            and self.loaded
            and older_than >= self.settings.key_ring_refresh_seconds
        ):
            # a reload is under way and the cached keys answer meanwhile: a
            # caller holding a pooled connection must not wait for a reload
            # that waits for a pooled connection (ten such callers held every
            # connection, and auth froze until the pool's timeout)
            return
        async with self._lock:
            now = time.monotonic()
            if now - self._loaded_at < older_than or now - self._attempted_at < older_than:
                return
            self._attempted_at = now
            try:
                await self.reload()
            except (SQLAlchemyError, OSError) as error:
                if not self.loaded:
                    self._attempted_at = float("-inf")  # nothing to answer with: try each time
                    raise ServiceUnavailable("Signing keys are not available yet") from error
                logger.warning("key ring refresh failed, keeping cached keys: %s", error)

    async def active_key(self) -> ActiveKey:
        await self._refresh(older_than=self.settings.key_ring_refresh_seconds)
        if self._active is None:
            raise ServiceUnavailable("Signing keys are not available yet")
        return self._active

    async def key_for(self, kid: str) -> VerificationKey | None:
        await self._refresh(older_than=self.settings.key_ring_refresh_seconds)
        key = self._public.get(kid)
        if key is None:
            await self._refresh(
                older_than=min(_UNKNOWN_KID_REFRESH_SECONDS, self.settings.key_ring_refresh_seconds)
            )
            key = self._public.get(kid)
        return key

    async def jwks(self) -> dict[str, Any]:
        await self._refresh(older_than=self.settings.key_ring_refresh_seconds)
        return self._jwks


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m auth.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every key of the ring: kid, created, state")
    commands.add_parser("rotate", help="a new key signs; the old one is published until expiry")
    commands.add_parser("retire", help="stop publishing a key at once").add_argument("kid")
    arguments = parser.parse_args(argv)
    settings = Settings()
    engine = make_engine(str(settings.database_url), pool_size=1, max_overflow=0)
    sessionmaker = make_sessionmaker(engine)
    try:
        if arguments.command == "list":
            keys = await ring(sessionmaker)
            lead = publish_lead(settings)
            signing = signing_row(keys, now=datetime.now(UTC), lead=lead)
            for key in keys:
                if key is signing:
                    state = "signing"
                elif key.retired_at is None:
                    state = f"published, signs from {key.created_at + lead:%FT%TZ}"
                else:
                    state = f"retired {key.retired_at:%FT%TZ}"
                print(f"{key.kid}\t{key.created_at:%FT%TZ}\t{state}")  # noqa: T201
        elif arguments.command == "rotate":
            print(await rotate(sessionmaker, settings))  # noqa: T201 - the command's output
        else:
            try:
                replacement = await retire(sessionmaker, settings, arguments.kid)
            except KeyRetirementRefused as error:
                print(f"error: {error}", file=sys.stderr)  # noqa: T201
                return 1
            window = settings.key_ring_refresh_seconds
            print(  # noqa: T201
                f"retired {arguments.kid}: auth refuses its tokens within {window:g} s, the other "
                "services once their key set refreshes"
                + (f"; {replacement} signs now" if replacement else "")
            )
    finally:
        await engine.dispose()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(asyncio.run(main()))
