"""The token endpoint's grants (RFC 6749): password, refresh_token and
client_credentials, with the RFC's error for every refusal.

Users log in through public clients (the apps a person uses), so the password
and refresh_token grants take no client authentication; a confidential client
(configured in OAUTH_CLIENTS) uses client_credentials only, which keeps every
refresh token a public client's and leaves nothing to bind it to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from auth import service
from auth.clients import Caller
from auth.config import USER_SCOPES, OAuthClient, Settings
from auth.errors import (
    InvalidClient,
    InvalidCredentials,
    InvalidGrant,
    InvalidRefreshToken,
    InvalidRequest,
    InvalidScope,
    UnauthorizedClient,
    UnsupportedGrantType,
    with_oauth_error,
)
from auth.keys import KeyRing
from auth.passwords import Passwords
from auth.schemas import MAX_PASSWORD_LENGTH, TokenRequest, login_email
from auth.throttle import LoginThrottle
from kit.errors import DomainError

GRANT_TYPES = ("password", "refresh_token", "client_credentials")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# longest accepted value of each parameter; longer is invalid_request
PARAMETER_LIMITS = {
    "grant_type": 64,
    "username": 320,
    "password": MAX_PASSWORD_LENGTH,
    "refresh_token": 256,
    "scope": 1024,
    "client_id": 255,
    "client_secret": 256,
    "token": 4096,
    "token_type_hint": 64,
}


@contextlib.contextmanager
def oauth_errors() -> Iterator[None]:
    """Every refusal inside becomes (or gains the members of) an RFC 6749 error:
    wrong credentials and unusable refresh tokens are 400 `invalid_grant` here,
    whatever status the same errors have elsewhere."""
    try:
        yield
    except (InvalidCredentials, InvalidRefreshToken) as error:
        raise InvalidGrant(error.detail) from error
    except DomainError as error:
        with_oauth_error(error)
        raise


async def check_form(request: Request, fields: tuple[str, ...]) -> None:
    """RFC 6749 section 3.2: form-encoded, each parameter at most once. (No
    body and no content type at all is an empty form.)"""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type and media_type not in FORM_TYPES:
        raise InvalidRequest("Send the parameters as application/x-www-form-urlencoded")
    form = await request.form()
    for name in fields:
        values = form.getlist(name)
        if len(values) > 1:
            raise InvalidRequest(f"{name} was sent more than once")
        if values and isinstance(values[0], str) and len(values[0]) > PARAMETER_LIMITS[name]:
            raise InvalidRequest(f"{name} is longer than {PARAMETER_LIMITS[name]} characters")


def required(value: str | None, name: str) -> str:
    if not value:
        raise InvalidRequest(f"{name} is required")
    return value


def requested_scopes(scope: str | None) -> list[str] | None:
    """The scope parameter's tokens in order, duplicates dropped; None when absent."""
    tokens = list(dict.fromkeys((scope or "").split()))
    return tokens or None


def check_user_scopes(scope: str | None) -> None:
    """A user's token is always granted all of USER_SCOPES; asking for less is
    allowed (RFC 6749 section 3.3 lets the server grant otherwise and say so in
    `scope`), asking for anything else is `invalid_scope`."""
    unknown = [token for token in requested_scopes(scope) or [] if token not in USER_SCOPES]
    if unknown:
        raise InvalidScope(
            f"Not a scope a user can be granted: {' '.join(unknown)} "
            f"(users get {' '.join(USER_SCOPES)})"
        )


def client_scopes(scope: str | None, client: OAuthClient) -> list[str]:
    """The scopes a machine client asked for, all of its own when it named none."""
    requested = requested_scopes(scope)
    if requested is None:
        return list(client.scopes)
    refused = [token for token in requested if token not in client.scopes]
    if refused:
        raise InvalidScope(f"This client may not have: {' '.join(refused)}")
    return requested


def grant_type_of(form: TokenRequest) -> str:
    grant_type = form.grant_type
    if not grant_type and form.username is not None:
        # this endpoint always took the password form without grant_type (as
        # FastAPI's OAuth2PasswordRequestForm does); clients that omit it keep working
        grant_type = "password"
    grant_type = required(grant_type, "grant_type")
    if grant_type not in GRANT_TYPES:
        raise UnsupportedGrantType(
            f"grant_type {grant_type!r} is not supported; use one of {', '.join(GRANT_TYPES)}"
        )
    return grant_type


async def client_credentials(
    form: TokenRequest, caller: Caller, *, key_ring: KeyRing, settings: Settings
) -> service.IssuedTokens:
    """A confidential client's own token, with the scopes it asked for among its own."""
    if caller.config is None or caller.client_id is None:
        raise InvalidClient("client_credentials needs a confidential client's credentials")
    return await service.issue_client_tokens(
        key_ring=key_ring,
        settings=settings,
        client_id=caller.client_id,
        client=caller.config,
        scopes=client_scopes(form.scope, caller.config),
    )


async def grant(
    form: TokenRequest,
    caller: Caller,
    *,
    session: AsyncSession,
    redis: Redis,
    key_ring: KeyRing,
    passwords: Passwords,
    settings: Settings,
    throttle: LoginThrottle,
    client_address: str,
) -> service.IssuedTokens:
    grant_type = grant_type_of(form)
    if grant_type == "client_credentials":
        return await client_credentials(form, caller, key_ring=key_ring, settings=settings)
    if caller.confidential:
        raise UnauthorizedClient(
            f"A confidential client uses client_credentials, not the {grant_type} grant"
        )
    if grant_type == "refresh_token":
        refresh_token = required(form.refresh_token, "refresh_token")
        check_user_scopes(form.scope)
        return await service.rotate_refresh_token(
            session=session,
            redis=redis,
            key_ring=key_ring,
            settings=settings,
            refresh_token=refresh_token,
        )
    email = login_email(required(form.username, "username"))
    password = required(form.password, "password")
    check_user_scopes(form.scope)
    user = await service.login(
        session=session,
        passwords=passwords,
        throttle=throttle,
        email=email,
        password=password,
        client=client_address,
    )
    return await service.issue_tokens(
        session=session,
        redis=redis,
        key_ring=key_ring,
        settings=settings,
        user=user,
        verified_hash=user.password_hash,
    )
