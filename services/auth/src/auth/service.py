"""Users, logins and token families: the SQL and the rules, no HTTP."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, Table, any_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.config import USER_SCOPES, OAuthClient, Settings
from auth.errors import (
    EmailTaken,
    InvalidCredentials,
    InvalidRefreshToken,
    InvalidResetToken,
    InvalidVerificationToken,
    SelfLockout,
    UserNotFound,
)
from auth.keys import KeyRing
from auth.models import (
    ROLE_ADMIN,
    ROLE_USER,
    EmailVerification,
    PasswordReset,
    RefreshToken,
    User,
)
from auth.passwords import Passwords
from auth.schemas import PASSWORD_IS_EMAIL, UserOut, is_the_email, normalise_email
from auth.throttle import LoginThrottle
from auth.tokens import (
    issue_access_token,
    issue_client_token,
    new_opaque_token,
    opaque_token_hash,
)
from kit.batching import BatchedReads
from kit.db import delete_in_batches
from kit.errors import DomainError, InvalidInput, ServiceUnavailable, Unauthenticated
from kit.point_pool import Connections
from kit.security import Principal, revoke_token, revoke_user, user_revoked_before

logger = logging.getLogger("auth.service")


# Every user token is granted all of these: they only name what the token may
# read about its own user (userinfo). A refresh grants the same again.
USER_SCOPE = " ".join(USER_SCOPES)


@dataclass(frozen=True, slots=True)
class IssuedTokens:
    access_token: str
    # None for a machine client: client_credentials issues no refresh token
    refresh_token: str | None
    expires_in: int
    scope: str


# --- users -----------------------------------------------------------------


async def register(
    *,
    session: AsyncSession,
    passwords: Passwords,
    email: str,
    password: str,
    display_name: str,
    roles: Sequence[str] = (ROLE_USER,),
    verification: Settings | None = None,
) -> tuple[User, str | None]:
    """The new account, and with `verification` the token to email that
    proves its address: the account and the token's row in one commit, so a
    failed commit leaves neither (the retry registers) and a committed one
    both. `email` arrives normalised (see `schemas.normalise_email`)."""
    taken = await session.scalar(select(User.id).where(User.email == email)) is not None
    # no connection held while the password is hashed (it may wait its turn)
    await session.rollback()
    if taken:
        raise EmailTaken
    user = User(
        email=email,
        display_name=display_name,
        password_hash=await passwords.hash(password),
        roles=list(roles),
    )
    session.add(user)
    token = None
    try:
        if verification is not None:
            await session.flush()  # the account's id, for the token's row
            token = _add_email_verification(session=session, settings=verification, user=user)
        await session.commit()
    except IntegrityError as error:  # registered concurrently since the check
        await session.rollback()
        raise EmailTaken from error
    await session.refresh(user)
    return user, token


async def get_user(*, session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise UserNotFound
    return user


async def current_user(*, reads: BatchedReads, principal: Principal) -> UserOut:
    """The account a verified access token speaks for, read on the point-read
    pool, batched with the others waiting (no session, no transaction): it may
    have been disabled or deleted since the token was issued."""
    user_id = _uuid_or_none(principal.user_id)
    row = None if user_id is None else await reads.fetch(user_id)
    if row is None or not row["is_active"]:
        raise Unauthenticated("This account no longer exists or is disabled")
    return UserOut.model_construct(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        roles=list(row["roles"]),
        is_active=row["is_active"],
        email_verified=row["email_verified_at"] is not None,
        created_at=row["created_at"],
    )


def user_reads(connections: Connections, *, max_in_flight: int) -> BatchedReads:
    """Reads of users by id on `connections`, batched (see kit.batching)."""
    return BatchedReads(
        connections,
        _USERS_BY_ID_SQL,
        key="id",
        on_lost=lambda _error: ServiceUnavailable("The account database is briefly unavailable"),
        max_in_flight=max_in_flight,
    )


# compiled once from the model: the columns are still written in one place
_USERS_BY_ID_SQL = str(
    select(
        User.id,
        User.email,
        User.display_name,
        User.roles,
        User.is_active,
        User.email_verified_at,
        User.created_at,
    )
    .where(User.id == any_(bindparam("ids", type_=ARRAY(User.id.type))))
    .compile(dialect=asyncpg_dialect.dialect())  # type: ignore[no-untyped-call]
)


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def encode_cursor(email: str) -> str:
    return base64.urlsafe_b64encode(email.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        email = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return ""
    return email.replace("\x00", "")


async def list_users(
    *, session: AsyncSession, limit: int, cursor: str | None
) -> tuple[list[User], str | None]:
    """Keyset pagination by email (unique), so pages never skip or repeat."""
    query = select(User).order_by(User.email).limit(limit + 1)
    if cursor:
        query = query.where(User.email > decode_cursor(cursor))
    users = list((await session.scalars(query)).all())
    if len(users) > limit:
        return users[:limit], encode_cursor(users[limit - 1].email)
    return users, None


async def update_user(
    *,
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    actor: Principal,
    user_id: uuid.UUID,
    changes: Mapping[str, Any],
) -> User:
    """Applies an admin's partial update.

    Deactivating revokes the user's refresh tokens and, through kit's per-user
    revocation time, every live access token at once. Taking a role away
    revokes the access tokens only: a refresh then yields the reduced roles.
    """
    user = await get_user(session=session, user_id=user_id)
    if str(user.id) == actor.user_id and (
        changes.get("is_active") is False
        or ("roles" in changes and ROLE_ADMIN not in changes["roles"])
    ):
        raise SelfLockout
    deactivated = changes.get("is_active") is False and user.is_active
    demoted = "roles" in changes and not set(user.roles) <= set(changes["roles"])
    if "roles" in changes:
        user.roles = sorted(set(changes["roles"]))
    if "is_active" in changes:
        user.is_active = changes["is_active"]
    if "display_name" in changes:
        user.display_name = changes["display_name"]
    if deactivated or demoted:
        await _commit_ending_sessions(
            session=session,
            redis=redis,
            settings=settings,
            user_id=user.id,
            refresh_tokens=deactivated,
        )
    else:
        await session.commit()
    await session.refresh(user)
    return user


async def _commit_ending_sessions(
    *,
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    user_id: uuid.UUID,
    refresh_tokens: bool = True,
) -> None:
    """Commits the session's change with every access token of the user issued
    before it refused everywhere, and with `refresh_tokens` every login
    session ended too.

    The revocation time goes to Redis before the commit: if Redis cannot take
    it, the answer is 503 and nothing was written, so the client's retry does
    the whole change again. Written after the commit, a change the retry finds
    already made (an account already inactive, a reset token already spent)
    would leave the old tokens working. It is written again after the commit,
    for a token a refresh minted meanwhile from the account as it was; if only
    that second write fails, the change and the first cutoff stand, and the
    log says so.

    The account's change is written first (flushed), holding its row: a login
    whose password check overlapped reads the account again `FOR SHARE`
    before it issues anything (`issue_tokens`), so it either waits for this
    commit and is refused, or committed first and its session is revoked
    here."""
    await session.flush()
    if refresh_tokens:
        await _revoke_refresh_tokens(session=session, user_id=user_id)
    await _revoke_user_tokens(redis=redis, settings=settings, user_id=user_id)
    await session.commit()
    try:
        await _revoke_user_tokens(redis=redis, settings=settings, user_id=user_id)
    except ServiceUnavailable:
        logger.error(
            "user %s: the revocation time was written before the change but not after it; "
            "a token refreshed during the change lives until it expires",
            user_id,
        )


async def _revoke_refresh_tokens(*, session: AsyncSession, user_id: uuid.UUID) -> None:
    """Ends every login session of the user (a refresh then answers 401). Caller commits."""
    await _revoke_every(session, RefreshToken.user_id == user_id, now=datetime.now(UTC))


async def _revoke_every(
    session: AsyncSession, which: ColumnElement[bool], *, now: datetime
) -> list[tuple[str, datetime]]:
    """Revokes every live refresh token `which` selects; returns the access
    token (jti, expiry) issued with each. Caller commits.

    The statement is repeated until it finds nothing left. A refresh under
    way holds its token's row (`FOR UPDATE`); the statement waits for it, but
    does not see the token that refresh adds: under READ COMMITTED a
    statement's snapshot is taken when it starts. The next statement does. A
    refresh that starts later waits for the rows revoked here, then finds
    its token revoked."""
    revoked: list[tuple[str, datetime]] = []
    while True:
        rows = await session.execute(
            update(RefreshToken)
            .where(which, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(RefreshToken.access_jti, RefreshToken.access_expires_at)
        )
        found = [(jti, expires_at) for jti, expires_at in rows.all()]
        if not found:
            return revoked
        revoked += found


async def _revoke_user_tokens(*, redis: Redis, settings: Settings, user_id: uuid.UUID) -> None:
    # kept one access-token lifetime (plus leeway): every older token has expired by then
    ttl = settings.access_token_ttl_seconds + 60
    try:
        async with asyncio.timeout(REVOCATION_WRITE_TIMEOUT_SECONDS):
            await revoke_user(redis, str(user_id), before=time.time(), ttl=ttl)
    except (RedisError, TimeoutError) as error:
        raise ServiceUnavailable("Token revocation list is unreachable; retry") from error


async def ensure_admin(
    *, sessionmaker: async_sessionmaker[AsyncSession], passwords: Passwords, settings: Settings
) -> None:
    """Makes ADMIN_EMAIL an admin with a verified address, creating it if missing.

    A new account gets ADMIN_PASSWORD, or without one a random password that
    is logged once, by the replica whose INSERT created the account (one
    INSERT ... ON CONFLICT, so replicas starting together agree). An existing
    account keeps its password: ADMIN_PASSWORD only creates the account, and
    the log says so when it no longer matches.
    """
    if settings.admin_email is None:
        return
    email = normalise_email(settings.admin_email)
    configured = settings.admin_password
    password = secrets.token_urlsafe(18) if configured is None else configured.get_secret_value()
    async with sessionmaker() as session:
        created, existing = await _create_or_promote_admin(
            session, email=email, password_hash=await passwords.hash(password)
        )
        await session.commit()
    change = f"docker compose run --rm auth python -m auth.admin set-password {email}"
    if created and configured is None:
        logger.warning(
            "created the admin account %s with a generated password, shown only this once: "
            "%s (change it with: %s)",
            email,
            password,
            change,
        )
    elif created:
        logger.info("created the admin account %s", email)
    elif (
        existing is not None
        and configured is not None
        and not await passwords.verify(existing.password_hash, password)
    ):
        logger.warning(
            "ADMIN_PASSWORD is not the password of the existing admin account %s: it is only "
            "used to create the account. Change the password with: %s",
            email,
            change,
        )
    else:
        logger.info("admin account %s ensured", email)


async def _create_or_promote_admin(
    session: AsyncSession, *, email: str, password_hash: str
) -> tuple[bool, User | None]:
    """Creates the admin account, or makes the existing account of that email
    an admin with a verified address. Whether it was created, and the
    existing account if not."""
    now = datetime.now(UTC)
    created = await session.scalar(
        insert(User)
        .values(
            id=uuid.uuid4(),
            email=email,
            display_name="Administrator",
            password_hash=password_hash,
            roles=[ROLE_ADMIN, ROLE_USER],
            email_verified_at=now,
        )
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User.id)
    )
    if created is not None:
        return True, None
    existing = await session.scalar(select(User).where(User.email == email))
    if existing is not None:
        if ROLE_ADMIN not in existing.roles:
            existing.roles = [*existing.roles, ROLE_ADMIN]
        existing.email_verified_at = existing.email_verified_at or now
    return False, existing


async def find_user(*, session: AsyncSession, email: str) -> User:
    """The account with this (normalised) email; UserNotFound otherwise."""
    user = await session.scalar(select(User).where(User.email == normalise_email(email)))
    if user is None:
        raise UserNotFound
    return user


async def set_password(
    *,
    session: AsyncSession,
    redis: Redis,
    passwords: Passwords,
    settings: Settings,
    user: User,
    password: str,
) -> None:
    """An operator sets the password: every session of the account ends, as on a reset."""
    if is_the_email(password, user.email):
        raise InvalidInput(
            PASSWORD_IS_EMAIL.capitalize(),
            errors=[{"loc": ["password"], "msg": PASSWORD_IS_EMAIL, "type": "value_error"}],
        )
    user.password_hash = await passwords.hash(password)
    await _commit_ending_sessions(session=session, redis=redis, settings=settings, user_id=user.id)


async def set_active(
    *, session: AsyncSession, redis: Redis, settings: Settings, user: User, active: bool
) -> None:
    """(De)activates an account; deactivating ends every session at once."""
    was_active, user.is_active = user.is_active, active
    if was_active and not active:
        await _commit_ending_sessions(
            session=session, redis=redis, settings=settings, user_id=user.id
        )
    else:
        await session.commit()


# --- logins and token families -----------------------------------------------


async def authenticate(
    *, session: AsyncSession, passwords: Passwords, email: str, password: str
) -> User:
    """The user for these credentials, upgrading an outdated hash on the way.

    An unknown email still costs one full verification (a dummy hash), so its
    401 cannot be told from a wrong password's by timing.
    """
    user = await session.scalar(select(User).where(User.email == email))
    # the account as read, apart from the session: its transaction ends, and
    # its connection goes back to the pool while the password is checked (a
    # check may wait its turn for a hashing slot)
    if user is not None:
        session.expunge(user)
    await session.rollback()
    if user is None:
        await passwords.burn_verify(password)
        raise InvalidCredentials
    if not await passwords.verify(user.password_hash, password) or not user.is_active:
        raise InvalidCredentials
    if passwords.needs_rehash(user.password_hash):
        upgraded = await passwords.hash(password)
        await session.execute(
            update(User)
            .where(User.id == user.id, User.password_hash == user.password_hash)
            .values(password_hash=upgraded)
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        user.password_hash = upgraded
        logger.info("upgraded password hash of user %s", user.id)
    return user


async def login(
    *,
    session: AsyncSession,
    passwords: Passwords,
    throttle: LoginThrottle,
    email: str,
    password: str,
    client: str,
) -> User:
    """A password login: the attempt counted before the password is checked
    (see throttle.py); a throttled login is RateLimited with its wait."""
    async with throttle.attempt(email=email, client=client):
        user = await authenticate(
            session=session, passwords=passwords, email=email, password=password
        )
    return user


async def _not_before(redis: Redis, user_id: uuid.UUID) -> float | None:
    """The user's revocation time, so a token issued in the same second is not
    caught by it. While Redis is away, the cutoff this process last mirrored:
    a login must not fail for it (nobody can write a new one meanwhile)."""
    return await user_revoked_before(redis, str(user_id))


async def issue_tokens(
    *,
    session: AsyncSession,
    redis: Redis,
    key_ring: KeyRing,
    settings: Settings,
    user: User,
    family_id: uuid.UUID | None = None,
    session_expires_at: datetime | None = None,
    verified_hash: str | None = None,
) -> IssuedTokens:
    """A new access token and the next refresh token of the family (a new
    family for a fresh login, whose absolute end is set now). Adds the refresh
    row and commits.

    `verified_hash`: the password hash a login just checked. The account is
    read again, held (`FOR SHARE`) until the commit, and must still be active
    with that password: a reset, a password change or a deactivation that
    came while the password was being checked either committed first (the
    login is refused) or waits for this commit, and then revokes what it
    issued. Without this, a login racing a reset kept its session."""
    if verified_hash is not None:
        current = await session.scalar(
            select(User).where(User.id == user.id).with_for_update(read=True)
        )
        if current is None or not current.is_active or current.password_hash != verified_hash:
            await session.rollback()
            raise InvalidCredentials
        user = current
    family_id = family_id or uuid.uuid4()
    now = datetime.now(UTC)
    session_expires_at = session_expires_at or now + timedelta(
        seconds=settings.session_max_lifetime_seconds
    )
    access = issue_access_token(
        key=await key_ring.active_key(),
        user_id=user.id,
        name=user.display_name,
        roles=user.roles,
        family_id=family_id,
        scope=USER_SCOPE,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        lifetime_seconds=settings.access_token_ttl_seconds,
        email_verified=user.email_verified_at is not None,
        not_before=await _not_before(redis, user.id),
    )
    refresh = new_opaque_token()
    session.add(
        RefreshToken(
            token_hash=opaque_token_hash(refresh),
            family_id=family_id,
            user_id=user.id,
            access_jti=access.jti,
            access_expires_at=datetime.fromtimestamp(access.expires_at, UTC),
            expires_at=min(
                now + timedelta(seconds=settings.refresh_token_ttl_seconds), session_expires_at
            ),
            session_expires_at=session_expires_at,
        )
    )
    await session.commit()
    return IssuedTokens(access.token, refresh, settings.access_token_ttl_seconds, USER_SCOPE)


async def issue_client_tokens(
    *,
    key_ring: KeyRing,
    settings: Settings,
    client_id: str,
    client: OAuthClient,
    scopes: Sequence[str],
) -> IssuedTokens:
    """A machine client's access token for `scopes` (already checked against
    the client's own); nothing is stored, and no refresh token is issued: the
    client asks again with its secret (RFC 6749 section 4.4.3)."""
    scope = " ".join(scopes)
    access = issue_client_token(
        key=await key_ring.active_key(),
        client_id=client_id,
        name=client.name or client_id,
        scope=scope,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        lifetime_seconds=settings.access_token_ttl_seconds,
    )
    return IssuedTokens(access.token, None, settings.access_token_ttl_seconds, scope)


async def rotate_refresh_token(
    *,
    session: AsyncSession,
    redis: Redis,
    key_ring: KeyRing,
    settings: Settings,
    refresh_token: str,
) -> IssuedTokens:
    """Spends a refresh token for a new pair in the same family, never past
    the family's absolute end (a token from before that end existed starts it).

    The row is locked (`FOR UPDATE`), so of two concurrent uses one wins and
    the other sees it used. A used token presented again means it was copied:
    the whole family is revoked, the token that replaced it included.
    """
    token = await session.scalar(
        select(RefreshToken)
        .where(RefreshToken.token_hash == opaque_token_hash(refresh_token))
        .with_for_update()
    )
    now = datetime.now(UTC)
    if token is None or token.revoked_at is not None or token.expires_at <= now:
        await session.rollback()
        raise InvalidRefreshToken
    if token.used_at is not None:
        logger.warning("refresh token reused; revoking family %s", token.family_id)
        await end_family(session=session, redis=redis, family_id=token.family_id)
        raise InvalidRefreshToken("Refresh token was already used; the session is revoked")
    user = await session.get(User, token.user_id)
    if user is None or not user.is_active:
        await end_family(session=session, redis=redis, family_id=token.family_id)
        raise InvalidRefreshToken
    token.used_at = now
    return await issue_tokens(
        session=session,
        redis=redis,
        key_ring=key_ring,
        settings=settings,
        user=user,
        family_id=token.family_id,
        session_expires_at=token.session_expires_at,
    )


async def end_family(
    *, session: AsyncSession, redis: Redis, family_id: uuid.UUID, but_jti: str | None = None
) -> None:
    """Ends a login session: revokes every refresh token of the family and
    commits, then blocklists every access token issued in it that has not
    expired, but `but_jti` (the caller's to blocklist, last).

    Each step can be done again: a retry after a failure anywhere (the
    commit, Redis) finds the family revoked and blocklists its access tokens
    again, those of rows revoked before included. So the access token a
    client retries a logout with stays usable until the rest is done, and a
    503 is always worth retrying."""
    await _revoke_every(session, RefreshToken.family_id == family_id, now=datetime.now(UTC))
    await session.commit()
    now = datetime.now(UTC)
    rows = await session.execute(
        select(RefreshToken.access_jti, RefreshToken.access_expires_at).where(
            RefreshToken.family_id == family_id, RefreshToken.access_expires_at > now
        )
    )
    live = [(jti, expires_at) for jti, expires_at in rows.all() if jti != but_jti]
    await session.rollback()  # nothing more to read: the connection goes back
    for jti, expires_at in live:
        await blocklist(redis=redis, jti=jti, expires_at=int(expires_at.timestamp()))


REVOCATION_WRITE_TIMEOUT_SECONDS = 3.0
"""A revocation Redis has not taken by then is a 503 to retry: a frozen Redis
must not hold the request (and, for the per-user time, the rows it locked)."""

SPENT_TOKENS_KEPT = timedelta(days=1)
"""How long past its expiry a token's row stays before it is purged."""


async def purge_expired_tokens(*, session: AsyncSession, now: datetime | None = None) -> int:
    """Deletes the refresh, reset and verification tokens that expired more
    than `SPENT_TOKENS_KEPT` ago, in batches (`kit.db.delete_in_batches`);
    returns how many.

    Nothing reads such a row: an expired token is refused before anything
    else is looked at (a reuse of one is not told from an unknown token, and
    its family's live token lives on), and the access token named beside a
    refresh token has expired long before. The limits on emails are Redis's."""
    cutoff = (now or datetime.now(UTC)) - SPENT_TOKENS_KEPT
    purged = 0
    for model in (RefreshToken, PasswordReset, EmailVerification):
        table = cast(Table, model.__table__)
        purged += await delete_in_batches(session, table, table.c.expires_at < cutoff)
    return purged


async def blocklist(*, redis: Redis, jti: str, expires_at: int) -> None:
    """kit's verifier refuses this `jti` until the token would have expired anyway."""
    ttl = max(1, expires_at - int(time.time()) + 1)
    try:
        async with asyncio.timeout(REVOCATION_WRITE_TIMEOUT_SECONDS):
            await revoke_token(redis, jti, ttl=ttl)
    except (RedisError, TimeoutError) as error:
        raise ServiceUnavailable("Token revocation list is unreachable; retry") from error


async def logout(*, session: AsyncSession, redis: Redis, principal: Principal) -> None:
    """Ends this access token and the login session it was issued in; this
    access token is blocklisted last, so a logout that failed part way (503)
    can be retried with it."""
    family_id = _uuid_or_none(principal.session_id)
    if family_id is not None:
        await end_family(session=session, redis=redis, family_id=family_id, but_jti=principal.jti)
    await blocklist(redis=redis, jti=principal.jti, expires_at=principal.expires_at)


async def revoke_refresh_token(*, session: AsyncSession, redis: Redis, refresh_token: str) -> bool:
    """Ends the login session a refresh token belongs to (RFC 7009): its whole
    family and the live access tokens issued with it, as logout does. A spent
    token of the family works too. False for a token auth never issued."""
    family_id = await session.scalar(
        select(RefreshToken.family_id).where(
            RefreshToken.token_hash == opaque_token_hash(refresh_token)
        )
    )
    if family_id is None:
        await session.rollback()
        return False
    await end_family(session=session, redis=redis, family_id=family_id)
    return True


@dataclass(frozen=True, slots=True)
class ActiveRefreshToken:
    user_id: uuid.UUID
    family_id: uuid.UUID
    issued_at: datetime
    expires_at: datetime


async def active_refresh_token(
    *, session: AsyncSession, refresh_token: str
) -> ActiveRefreshToken | None:
    """What introspection tells of a refresh token that a refresh would accept
    right now: not spent, not revoked, not expired, its account active."""
    row = (
        await session.execute(
            select(
                RefreshToken.user_id,
                RefreshToken.family_id,
                RefreshToken.created_at,
                RefreshToken.expires_at,
            )
            .join(User, User.id == RefreshToken.user_id)
            .where(
                RefreshToken.token_hash == opaque_token_hash(refresh_token),
                RefreshToken.used_at.is_(None),
                RefreshToken.revoked_at.is_(None),
                RefreshToken.expires_at > func.now(),
                User.is_active,
            )
        )
    ).one_or_none()
    await session.rollback()
    return None if row is None else ActiveRefreshToken(*row)


# --- password resets -------------------------------------------------------


async def request_password_reset(
    *, session: AsyncSession, settings: Settings, email: str
) -> tuple[User, str] | None:
    """A new reset token for the active account with this email, or None.

    The caller answers the same either way and emails the token: the reply
    never tells whether an account exists. Earlier tokens stay valid until
    they expire or one of them is used.
    """
    user = await session.scalar(select(User).where(User.email == email))
    if user is None or not user.is_active:
        return None
    token = new_opaque_token()
    session.add(
        PasswordReset(
            token_hash=opaque_token_hash(token),
            user_id=user.id,
            expires_at=datetime.now(UTC) + timedelta(seconds=settings.password_reset_ttl_seconds),
        )
    )
    await session.commit()
    return user, token


async def reset_password(
    *,
    session: AsyncSession,
    redis: Redis,
    passwords: Passwords,
    settings: Settings,
    throttle: LoginThrottle,
    token: str,
    password: str,
) -> User:
    """Sets a new password with a reset token, once; returns the account.

    Every outstanding reset token of the user is spent with it, and every
    session ends: refresh tokens are revoked and access tokens issued before
    now are refused everywhere (kit's per-user revocation time), since a reset
    usually means the old password was lost or stolen. The token came by
    email, so using it proves the address: an unverified one is verified (the
    owner of an address someone else registered takes the account back, and
    its sessions end, in one step).
    """
    now = datetime.now(UTC)
    # the token and the password checked first, nothing held: the hash may
    # wait its turn for a slot, and no connection or lock waits with it
    user = await _token_holder(
        session, PasswordReset, token=token, now=now, refused=InvalidResetToken, lock=False
    )
    is_email = is_the_email(password, user.email)
    await session.rollback()
    if is_email:
        raise InvalidInput(
            PASSWORD_IS_EMAIL.capitalize(),
            errors=[{"loc": ["body", "password"], "msg": PASSWORD_IS_EMAIL, "type": "value_error"}],
        )
    password_hash = await passwords.hash(password)
    # then held, and checked again: a reset racing this one may have spent it
    user = await _token_holder(
        session, PasswordReset, token=token, now=now, refused=InvalidResetToken
    )
    user.password_hash = password_hash
    user.email_verified_at = user.email_verified_at or now
    await session.execute(
        update(PasswordReset)
        .where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None))
        .values(used_at=now)
    )
    await _commit_ending_sessions(session=session, redis=redis, settings=settings, user_id=user.id)
    # the owner proved who they are: failed-login counts against the account go
    await throttle.forgive(email=user.email)
    logger.info("password reset for user %s", user.id)
    return user


OneTimeToken = TypeVar("OneTimeToken", PasswordReset, EmailVerification)


async def _token_holder(
    session: AsyncSession,
    model: type[OneTimeToken],
    *,
    token: str,
    now: datetime,
    refused: type[DomainError],
    lock: bool = True,
) -> User:
    """The active account a live, unused one-time token (a password reset, an
    email verification) belongs to, else `refused`; with `lock`, the account
    and then the token locked until the transaction ends.

    Always the account first: two tokens of one account used at once (a
    reset email asked for twice) then wait in turn, where locking each token
    first made them deadlock on spending each other's."""
    token_hash = opaque_token_hash(token)
    row = await session.scalar(select(model).where(model.token_hash == token_hash))
    user = None
    if row is not None and lock:
        # FOR NO KEY UPDATE, as the UPDATE of the account would take it: a
        # refresh under way adds a token row, whose foreign key check shares
        # the account's key, and must not wait for this (it holds the token
        # row this transaction's ending of sessions waits for)
        user = await session.scalar(
            select(User)
            .where(User.id == row.user_id)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
        row = await session.scalar(
            select(model)
            .where(model.token_hash == token_hash)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    elif row is not None:
        user = await session.get(User, row.user_id)
    if (
        row is None
        or user is None
        or row.used_at is not None
        or row.expires_at <= now
        or not user.is_active
    ):
        await session.rollback()
        raise refused
    return user


# --- email verification ----------------------------------------------------


async def new_email_verification(*, session: AsyncSession, settings: Settings, user: User) -> str:
    """A single-use token proving the user's address, to be emailed; commits.
    Earlier tokens stay valid until they expire or one of them is used."""
    token = _add_email_verification(session=session, settings=settings, user=user)
    await session.commit()
    return token


def _add_email_verification(*, session: AsyncSession, settings: Settings, user: User) -> str:
    """Adds a verification token's row (the caller commits); returns the token."""
    token = new_opaque_token()
    session.add(
        EmailVerification(
            token_hash=opaque_token_hash(token),
            user_id=user.id,
            expires_at=datetime.now(UTC)
            + timedelta(seconds=settings.email_verification_ttl_seconds),
        )
    )
    return token


async def verification_to_resend(
    *, session: AsyncSession, settings: Settings, email: str
) -> tuple[User, str] | None:
    """A new token for the active, unverified account with this email, or None;
    the caller answers the same either way."""
    user = await session.scalar(select(User).where(User.email == email))
    if user is None or not user.is_active or user.email_verified_at is not None:
        return None
    return user, await new_email_verification(session=session, settings=settings, user=user)


async def verify_email(*, session: AsyncSession, token: str) -> User:
    """Marks the address verified with a token, once; every outstanding token
    of the user is spent with it. New access tokens (a refresh or a login)
    then carry `email_verified: true`."""
    now = datetime.now(UTC)
    user = await _token_holder(
        session, EmailVerification, token=token, now=now, refused=InvalidVerificationToken
    )
    user.email_verified_at = user.email_verified_at or now
    await session.execute(
        update(EmailVerification)
        .where(EmailVerification.user_id == user.id, EmailVerification.used_at.is_(None))
        .values(used_at=now)
    )
    await session.commit()
    logger.info("email verified for user %s", user.id)
    return user
