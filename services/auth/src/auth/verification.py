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

from fastapi import APIRouter, BackgroundTasks, Response

from auth import service
from auth.deps import RedisDep, SessionDep, SettingsDep
from auth.mail import send_verification_email
from auth.schemas import EmailResendIn, EmailVerifyIn
from auth.throttle import verification_email_allowance

router = APIRouter(prefix="/auth/email", tags=["auth"])


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
    async with verification_email_allowance(
        redis=redis, settings=settings, email=body.email
    ) as allowed:
        issued = (
            await service.verification_to_resend(
                session=session, settings=settings, email=body.email
            )
            if allowed
            else None
        )
    if issued is not None:
        user, token = issued
        background.add_task(send_verification_email, settings=settings, to=user.email, token=token)
    return Response(status_code=202)
