"""The standard OAuth 2.0 and OpenID Connect endpoints besides the token
endpoint: revocation (RFC 7009), introspection (RFC 7662), userinfo (OpenID
Connect Core 5.3) and discovery (RFC 8414, OpenID Connect Discovery)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response
from redis.asyncio import Redis

from auth import service
from auth.clients import Caller, authenticate_client
from auth.deps import RedisDep, SessionDep, SettingsDep
from auth.discovery import CACHE_CONTROL, encoded_metadata
from auth.errors import (
    InsufficientScope,
    InvalidClient,
    InvalidToken,
    UnauthorizedClient,
)
from auth.grants import check_form, oauth_errors, required
from auth.models import User
from auth.schemas import Introspection, ServerMetadata, TokenLookup, UserInfo
from kit.deps import CurrentPrincipal, VerifierDep, oauth2_scheme
from kit.errors import Unauthenticated
from kit.security import TokenVerifier

router = APIRouter(prefix="/auth", tags=["oauth"])
LookupForm = Annotated[TokenLookup, Form()]
LOOKUP_FIELDS = tuple(TokenLookup.model_fields)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def is_access_token(token: str) -> bool:
    """Access tokens are JWTs (three dot-separated parts); refresh tokens are
    URL-safe Base64 with no dot. The shape decides, so `token_type_hint` is
    not needed (RFC 7009 and RFC 7662 let a server that can tell ignore it)."""
    return token.count(".") == 2


async def _caller(request: Request, form: TokenLookup, settings: SettingsDep) -> Caller:
    await check_form(request, LOOKUP_FIELDS)
    return authenticate_client(
        settings=settings,
        authorization=request.headers.get("authorization"),
        client_id=form.client_id,
        client_secret=form.client_secret,
    )


@router.post(
    "/revoke",
    status_code=200,
    response_class=Response,
    summary="Revoke a refresh or access token (RFC 7009)",
    description="A refresh token ends its whole login session (every refresh token of it "
    "and the access tokens issued with them), like logout; an access token is refused "
    "everywhere from now on. An unknown, expired or already revoked token is 200 too. "
    "A machine client's token can be revoked only by that client, authenticated.",
    response_description="Revoked, or there was nothing to revoke",
)
async def revoke(
    request: Request,
    form: LookupForm,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    verifier: VerifierDep,
) -> Response:
    with oauth_errors():
        caller = await _caller(request, form, settings)
        token = required(form.token, "token")
        if is_access_token(token):
            await _revoke_access_token(token, caller=caller, redis=redis, verifier=verifier)
        else:
            await service.revoke_refresh_token(session=session, redis=redis, refresh_token=token)
    return Response(status_code=200, headers=NO_STORE)


async def _revoke_access_token(
    token: str, *, caller: Caller, redis: Redis, verifier: TokenVerifier
) -> None:
    try:
        claims = await verifier.verified_claims(token)
    except Unauthenticated:
        return  # not a token of ours, or expired: nothing left to revoke
    owner = claims.get("client_id")
    if owner is not None and owner != (caller.client_id if caller.confidential else None):
        if not caller.confidential:
            raise InvalidClient("A machine client's token is revoked by that client, authenticated")
        raise UnauthorizedClient("This token was issued to another client")
    await service.blocklist(redis=redis, jti=str(claims["jti"]), expires_at=int(claims["exp"]))


@router.post(
    "/introspect",
    summary="Introspect a token (RFC 7662), for resource servers",
    description="Only for confidential clients configured with `introspect: true`, "
    "authenticated with HTTP Basic (`client_secret_basic`) or `client_secret_post`. "
    'An invalid, expired or revoked token is `{"active": false}`.',
    response_model_exclude_none=True,
)
async def introspect(
    request: Request,
    form: LookupForm,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    verifier: VerifierDep,
) -> Introspection:
    with oauth_errors():
        caller = await _caller(request, form, settings)
        if caller.config is None:
            raise InvalidClient("Introspection needs a resource server's client credentials")
        if not caller.config.introspect:
            raise UnauthorizedClient("This client may not introspect tokens")
        token = required(form.token, "token")
        response.headers.update(NO_STORE)
        if is_access_token(token):
            return await _introspect_access_token(token, verifier)
        active = await service.active_refresh_token(session=session, refresh_token=token)
    if active is None:
        return Introspection(active=False)
    return Introspection(
        active=True,
        scope=service.USER_SCOPE,
        exp=int(active.expires_at.timestamp()),
        iat=int(active.issued_at.timestamp()),
        sub=str(active.user_id),
        iss=settings.jwt_issuer,
        sid=str(active.family_id),
    )


async def _introspect_access_token(token: str, verifier: TokenVerifier) -> Introspection:
    try:
        await verifier.verify(token)  # signature, claims, and not revoked
        claims = await verifier.verified_claims(token)
    except Unauthenticated:
        return Introspection(active=False)
    return Introspection(
        active=True,
        scope=claims.get("scope"),
        client_id=claims.get("client_id"),
        token_type="Bearer",
        exp=claims["exp"],
        iat=claims["iat"],
        sub=claims["sub"],
        aud=claims.get("aud"),
        iss=claims.get("iss"),
        jti=claims["jti"],
        name=claims.get("name"),
        roles=claims.get("roles"),
        sid=claims.get("sid"),
    )


def email_verified(user: User) -> bool:
    """Whether the account's email address was confirmed (`/auth/email/verify`)."""
    return user.email_verified_at is not None


@router.get(
    "/userinfo",
    summary="The caller's standard claims (OpenID Connect userinfo)",
    description="Needs a user's access token with the `openid` scope; `profile` adds "
    "`name` and `updated_at`, `email` adds `email` and `email_verified`. A machine "
    "client's token is 403 `insufficient_scope`.",
    response_model_exclude_none=True,
)
@router.post(
    "/userinfo",
    summary="The caller's standard claims (OpenID Connect userinfo, POST form)",
    response_model_exclude_none=True,
)
async def userinfo(
    principal: CurrentPrincipal,
    raw_token: Annotated[str | None, Depends(oauth2_scheme)],
    verifier: VerifierDep,
    session: SessionDep,
    response: Response,
) -> UserInfo:
    # CurrentPrincipal verified the token; its claims are now cached
    claims = await verifier.verified_claims(raw_token or "")
    scopes = set(str(claims.get("scope", "")).split())
    if "openid" not in scopes:
        raise InsufficientScope("openid")
    try:
        user = await session.get(User, uuid.UUID(principal.user_id))
    except ValueError:
        user = None
    if user is None or not user.is_active:
        raise InvalidToken("This account no longer exists or is disabled")
    response.headers.update(NO_STORE)
    info = UserInfo(sub=str(user.id))
    if "profile" in scopes:
        info.name = user.display_name
        info.updated_at = int(user.updated_at.timestamp())
    if "email" in scopes:
        info.email = user.email
        info.email_verified = email_verified(user)
    return info


def _metadata_response(request: Request, settings: SettingsDep) -> Response:
    body, etag = encoded_metadata(settings)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag}
    presented = request.headers.get("if-none-match", "")
    if etag in (tag.strip().removeprefix("W/") for tag in presented.split(",")) or (
        presented.strip() == "*"
    ):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get(
    "/.well-known/openid-configuration",
    summary="OpenID Connect discovery: issuer, endpoints, grants, scopes, algorithms",
    response_model=ServerMetadata,
)
async def openid_configuration(request: Request, settings: SettingsDep) -> Response:
    return _metadata_response(request, settings)


@router.get(
    "/.well-known/oauth-authorization-server",
    summary="OAuth 2.0 authorization-server metadata (RFC 8414), the same document",
    response_model=ServerMetadata,
)
async def authorization_server_metadata(request: Request, settings: SettingsDep) -> Response:
    return _metadata_response(request, settings)
