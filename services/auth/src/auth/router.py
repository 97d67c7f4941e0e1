"""Auth's HTTP surface; each route parses, calls the service, shapes the reply."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Query, Request, Response

from auth import service
from auth.clients import authenticate_client
from auth.cookies import RefreshCookieDep
from auth.deps import (
    ClientAddress,
    KeyRingDep,
    PasswordsDep,
    RedisDep,
    SessionDep,
    SettingsDep,
    ThrottleDep,
    UserReadsDep,
)
from auth.errors import InvalidRefreshToken
from auth.grants import check_form, grant, oauth_errors
from auth.mail import send_reset_email, send_welcome_email
from auth.schemas import (
    PasswordForgotIn,
    PasswordResetIn,
    RefreshIn,
    RegisterIn,
    TokenPair,
    TokenRequest,
    UserOut,
    UserPage,
    UserPatch,
)
from auth.throttle import reset_email_allowance
from kit.deps import AdminPrincipal, CurrentPrincipal

router = APIRouter(prefix="/auth", tags=["auth"])
TokenForm = Annotated[TokenRequest, Form()]
TOKEN_FIELDS = tuple(TokenRequest.model_fields)


def token_response(
    tokens: service.IssuedTokens,
    response: Response,
    cookie: RefreshCookieDep,
    settings: SettingsDep,
) -> TokenPair:
    """The one place a token response is shaped, for `/auth/token` and
    `/auth/refresh` alike: nothing may cache it (RFC 6749 section 5.1), and a
    browser that asked for it gets its refresh token as a cookie."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    pair = TokenPair(
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        expires_in=tokens.expires_in,
        scope=tokens.scope,
    )
    return cookie.deliver(pair, max_age=settings.refresh_token_ttl_seconds)


@router.post("/register", status_code=201, summary="Create an account")
async def register(
    body: RegisterIn,
    session: SessionDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> UserOut:
    user, verification_token = await service.register(
        session=session,
        passwords=passwords,
        email=body.email,
        password=body.password,
        display_name=body.display_name,
        verification=settings,
    )
    assert verification_token is not None  # asked for, with `verification`
    background.add_task(
        send_welcome_email,
        settings=settings,
        to=user.email,
        display_name=user.display_name,
        verification_token=verification_token,
    )
    return UserOut.of(user)


@router.post(
    "/token",
    summary="OAuth 2.0 token endpoint: password, refresh_token, client_credentials",
    description="RFC 6749. Errors are problem+json with `error` and `error_description`: "
    "400 `invalid_request`, `invalid_grant` (wrong email or password, unusable refresh "
    "token), `unsupported_grant_type`, `invalid_scope`, `unauthorized_client`; 401 "
    "`invalid_client`; 429 `temporarily_unavailable` with `Retry-After` after too many "
    "failed logins.",
    response_model_exclude_none=True,
)
async def token(
    request: Request,
    form: TokenForm,
    response: Response,
    session: SessionDep,
    redis: RedisDep,
    key_ring: KeyRingDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    throttle: ThrottleDep,
    client: ClientAddress,
    cookie: RefreshCookieDep,
) -> TokenPair:
    with oauth_errors():
        await check_form(request, TOKEN_FIELDS)
        caller = authenticate_client(
            settings=settings,
            authorization=request.headers.get("authorization"),
            client_id=form.client_id,
            client_secret=form.client_secret,
        )
        tokens = await grant(
            form,
            caller,
            session=session,
            redis=redis,
            key_ring=key_ring,
            passwords=passwords,
            settings=settings,
            throttle=throttle,
            client_address=client,
        )
    return token_response(tokens, response, cookie, settings)


@router.post(
    "/refresh",
    summary="Exchange a refresh token (JSON body, or the cookie) for a new pair; "
    "`/auth/token` is the standard way",
    response_model_exclude_none=True,
)
async def refresh(
    response: Response,
    session: SessionDep,
    redis: RedisDep,
    key_ring: KeyRingDep,
    settings: SettingsDep,
    cookie: RefreshCookieDep,
    body: RefreshIn | None = None,
) -> TokenPair:
    refresh_token = body.refresh_token if body is not None else cookie.value
    if not refresh_token:
        raise InvalidRefreshToken("No refresh token in the body or the cookie")
    tokens = await service.rotate_refresh_token(
        session=session,
        redis=redis,
        key_ring=key_ring,
        settings=settings,
        refresh_token=refresh_token,
    )
    return token_response(tokens, response, cookie, settings)


@router.post("/logout", status_code=204, summary="Revoke this access token and its session")
async def logout(
    principal: CurrentPrincipal,
    session: SessionDep,
    redis: RedisDep,
    cookie: RefreshCookieDep,
) -> Response:
    await service.logout(session=session, redis=redis, principal=principal)
    answer = Response(status_code=204)
    cookie.clear(answer)
    return answer


@router.post(
    "/password/forgot",
    status_code=202,
    response_class=Response,
    summary="Email a password reset token",
    response_description="Accepted, whether or not the email has an account",
)
async def forgot_password(
    body: PasswordForgotIn,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> Response:
    async with reset_email_allowance(redis=redis, settings=settings, email=body.email) as allowed:
        issued = (
            await service.request_password_reset(
                session=session, settings=settings, email=body.email
            )
            if allowed
            else None
        )
    if issued is not None:
        user, reset_token = issued
        background.add_task(send_reset_email, settings=settings, to=user.email, token=reset_token)
    return Response(status_code=202)


@router.post(
    "/password/reset",
    status_code=204,
    summary="Set a new password with a reset token; ends every session",
)
async def reset_password(
    body: PasswordResetIn,
    session: SessionDep,
    redis: RedisDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    throttle: ThrottleDep,
) -> Response:
    await service.reset_password(
        session=session,
        redis=redis,
        passwords=passwords,
        settings=settings,
        throttle=throttle,
        token=body.token,
        password=body.password,
    )
    return Response(status_code=204)


@router.get("/users/me", response_model=UserOut, summary="The caller's account")
async def me(principal: CurrentPrincipal, user_reads: UserReadsDep) -> Response:
    user = await service.current_user(reads=user_reads, principal=principal)
    return Response(user.model_dump_json(), media_type="application/json")


@router.get("/users", summary="List accounts (admin)")
async def list_users(
    _: AdminPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> UserPage:
    users, next_cursor = await service.list_users(
        session=session, limit=min(limit, settings.users_page_max), cursor=cursor
    )
    return UserPage(items=[UserOut.of(user) for user in users], next_cursor=next_cursor)


@router.patch("/users/{user_id}", summary="Change roles, status or name (admin)")
async def update_user(
    user_id: uuid.UUID,
    body: UserPatch,
    actor: AdminPrincipal,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
) -> UserOut:
    user = await service.update_user(
        session=session,
        redis=redis,
        settings=settings,
        actor=actor,
        user_id=user_id,
        changes=body.model_dump(exclude_unset=True),
    )
    return UserOut.of(user)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(key_ring: KeyRingDep, response: Response) -> dict[str, Any]:
    # verifiers refetch on an unknown kid anyway; this only bounds idle caches
    response.headers["Cache-Control"] = "public, max-age=60"
    return await key_ring.jwks()
