"""Auth's HTTP surface; each route parses, calls the service, shapes the reply."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Response
from fastapi.security import OAuth2PasswordRequestForm
from jose import jwt

from auth import service
from auth.deps import (
    ClientAddress,
    KeyRingDep,
    PasswordsDep,
    RedisDep,
    SessionDep,
    SettingsDep,
    ThrottleDep,
)
from auth.errors import InvalidCredentials
from auth.mail import send_reset_email, send_welcome_email
from auth.models import User
from auth.schemas import (
    PasswordForgotIn,
    PasswordResetIn,
    RefreshIn,
    RegisterIn,
    TokenPair,
    UserOut,
    UserPage,
    UserPatch,
    login_email,
)
from auth.throttle import allow_reset_email
from kit.deps import AdminPrincipal, CurrentPrincipal, oauth2_scheme
from kit.errors import Unauthenticated

router = APIRouter(prefix="/auth", tags=["auth"])
PasswordForm = Annotated[OAuth2PasswordRequestForm, Depends()]


def _pair(tokens: service.IssuedTokens) -> TokenPair:
    return TokenPair(
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        expires_in=tokens.expires_in,
    )


@router.post("/register", status_code=201, summary="Create an account")
async def register(
    body: RegisterIn,
    session: SessionDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> UserOut:
    user = await service.register(
        session=session,
        passwords=passwords,
        email=body.email,
        password=body.password,
        display_name=body.display_name,
    )
    verification_token = await service.new_email_verification(
        session=session, settings=settings, user=user
    )
    background.add_task(
        send_welcome_email,
        settings=settings,
        to=user.email,
        display_name=user.display_name,
        verification_token=verification_token,
    )
    return UserOut.of(user)


@router.post("/token", summary="Log in with the OAuth2 password form")
async def token(
    form: PasswordForm,
    session: SessionDep,
    redis: RedisDep,
    key_ring: KeyRingDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    throttle: ThrottleDep,
    client: ClientAddress,
) -> TokenPair:
    email = login_email(form.username)
    await throttle.ensure_allowed(email=email, client=client)
    try:
        user = await service.authenticate(
            session=session, passwords=passwords, email=email, password=form.password
        )
    except InvalidCredentials:
        await throttle.record_failure(email=email, client=client)
        raise
    await throttle.record_success(email=email)
    tokens = await service.issue_tokens(
        session=session, redis=redis, key_ring=key_ring, settings=settings, user=user
    )
    return _pair(tokens)


@router.post("/refresh", summary="Exchange a refresh token for a new pair")
async def refresh(
    body: RefreshIn,
    session: SessionDep,
    redis: RedisDep,
    key_ring: KeyRingDep,
    settings: SettingsDep,
) -> TokenPair:
    tokens = await service.rotate_refresh_token(
        session=session,
        redis=redis,
        key_ring=key_ring,
        settings=settings,
        refresh_token=body.refresh_token,
    )
    return _pair(tokens)


@router.post("/logout", status_code=204, summary="Revoke this access token and its session")
async def logout(
    principal: CurrentPrincipal,
    raw_token: Annotated[str | None, Depends(oauth2_scheme)],
    session: SessionDep,
    redis: RedisDep,
) -> Response:
    # the token was verified by CurrentPrincipal; read the session id it carries
    claims = jwt.get_unverified_claims(raw_token or "")
    family_id = _uuid_or_none(claims.get("sid"))
    await service.logout(session=session, redis=redis, principal=principal, family_id=family_id)
    return Response(status_code=204)


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


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
    if await allow_reset_email(redis=redis, settings=settings, email=body.email):
        issued = await service.request_password_reset(
            session=session, settings=settings, email=body.email
        )
        if issued is not None:
            user, reset_token = issued
            background.add_task(
                send_reset_email, settings=settings, to=user.email, token=reset_token
            )
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
) -> Response:
    await service.reset_password(
        session=session,
        redis=redis,
        passwords=passwords,
        settings=settings,
        token=body.token,
        password=body.password,
    )
    return Response(status_code=204)


@router.get("/users/me", summary="The caller's account")
async def me(principal: CurrentPrincipal, session: SessionDep) -> UserOut:
    user_id = _uuid_or_none(principal.user_id)
    user = None if user_id is None else await session.get(User, user_id)
    if user is None or not user.is_active:
        raise Unauthenticated("This account no longer exists or is disabled")
    return UserOut.of(user)


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
