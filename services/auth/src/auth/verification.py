"""Email verification over HTTP: confirm an address with the emailed token,
or ask for another email.

Registration emails the first token (see `router.register`). Asking again
answers 202 whatever the address, like a password reset: the reply never
tells whether an account exists or is already verified. Each address gets at
most `EMAIL_VERIFICATION_EMAILS_PER_ACCOUNT` emails per window, counted in
Redis whether or not the address has an account; past that the request is
still accepted and nothing is sent.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, BackgroundTasks, Response
from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth import service
from auth.config import Settings
from auth.deps import RedisDep, SessionDep, SettingsDep
from auth.mail import send_verification_email
from auth.schemas import EmailResendIn, EmailVerifyIn
from kit.errors import ServiceUnavailable

router = APIRouter(prefix="/auth/email", tags=["auth"])


def verification_emails_key(email: str) -> str:
    """A digest of the address, so Redis holds no email addresses."""
    return f"auth:email-verification:emails:{hashlib.sha256(email.encode()).hexdigest()[:32]}"


async def allow_verification_email(*, redis: Redis, settings: Settings, email: str) -> bool:
    """Counts one verification email for the address; False past the window's limit."""
    key = verification_emails_key(email)
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=settings.email_verification_window_seconds, nx=True)
            pipe.incr(key)
            _, count = await pipe.execute()
    except RedisError as error:
        raise ServiceUnavailable("Verification throttling is unavailable; retry") from error
    return int(count) <= settings.email_verification_emails_per_account


@router.post(
    "/verify",
    status_code=204,
    response_class=Response,
    summary="Confirm the account's email address with the emailed token",
)
async def verify_email(body: EmailVerifyIn, session: SessionDep) -> Response:
    await service.verify_email(session=session, token=body.token)
    return Response(status_code=204)


@router.post(
    "/verify/resend",
    status_code=202,
    response_class=Response,
    summary="Email a new verification token",
    response_description="Accepted, whether or not the email has an unverified account",
)
async def resend_verification(
    body: EmailResendIn,
    session: SessionDep,
    redis: RedisDep,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> Response:
    if await allow_verification_email(redis=redis, settings=settings, email=body.email):
        issued = await service.verification_to_resend(
            session=session, settings=settings, email=body.email
        )
        if issued is not None:
            user, token = issued
            background.add_task(
                send_verification_email, settings=settings, to=user.email, token=token
            )
    return Response(status_code=202)
