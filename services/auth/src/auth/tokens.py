"""Issuing tokens: ES256 access tokens and opaque refresh tokens.

Verification is kit's job (`kit.security.TokenVerifier`); this module only
mints what it checks.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jose import jwt

from auth.keys import ALGORITHM, ActiveKey
from kit.security import ACCESS_TOKEN_TYPE

REFRESH_TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str
    jti: str
    expires_at: int


def issue_access_token(
    *,
    key: ActiveKey,
    user_id: uuid.UUID,
    name: str,
    roles: Sequence[str],
    family_id: uuid.UUID,
    scope: str,
    issuer: str,
    audience: str,
    lifetime_seconds: int,
    email_verified: bool = False,
    not_before: float | None = None,
) -> AccessToken:
    """A user's access token. `not_before` is the user's revocation time, if
    any: a token minted in the same second must still be newer than it, so
    `iat` is rounded up past it."""
    return _signed(
        key=key,
        claims={
            "sub": str(user_id),
            "name": name,
            "roles": list(roles),
            "scope": scope,
            "email_verified": email_verified,
            # the login session (refresh-token family), so logout can end it
            "sid": str(family_id),
        },
        issuer=issuer,
        audience=audience,
        lifetime_seconds=lifetime_seconds,
        not_before=not_before,
    )


def issue_client_token(
    *,
    key: ActiveKey,
    client_id: str,
    name: str,
    scope: str,
    issuer: str,
    audience: str,
    lifetime_seconds: int,
) -> AccessToken:
    """A machine client's access token (client_credentials grant): the client
    is its own subject (RFC 9068), it has no roles, and `scope` says what it
    may do."""
    return _signed(
        key=key,
        claims={
            "sub": client_id,
            "client_id": client_id,
            "name": name,
            "roles": [],
            "scope": scope,
        },
        issuer=issuer,
        audience=audience,
        lifetime_seconds=lifetime_seconds,
        not_before=None,
    )


def _signed(
    *,
    key: ActiveKey,
    claims: dict[str, Any],
    issuer: str,
    audience: str,
    lifetime_seconds: int,
    not_before: float | None,
) -> AccessToken:
    now = time.time()
    issued_at = int(now)
    if not_before is not None and issued_at < not_before:
        issued_at = math.ceil(not_before)
    jti = uuid.uuid4().hex
    expires_at = int(now) + lifetime_seconds
    claims = {
        **claims,
        "iat": issued_at,
        "exp": expires_at,
        "jti": jti,
        "iss": issuer,
        "aud": audience,
        "typ": ACCESS_TOKEN_TYPE,
    }
    token: str = jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})
    return AccessToken(token, jti, expires_at)


def new_opaque_token() -> str:
    """A refresh or password-reset token: random, meaningless to its holder."""
    return secrets.token_urlsafe(REFRESH_TOKEN_BYTES)


def opaque_token_hash(token: str) -> str:
    """Only this digest is stored: a leaked table cannot be replayed. The token
    has 256 random bits, so a fast hash is enough (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()
