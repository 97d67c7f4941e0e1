"""Emails: the welcome after a registration (with the link that verifies the
address), a resent verification link and the password reset token, each sent
after the response has gone out.

With `SMTP_URL` (`smtp://user:password@host:port`, or `smtps://` for implicit
TLS; `?starttls=1` upgrades a plain connection) it goes over SMTP in a worker
thread. Without one nothing is sent, and the log says who would have got what
kind of email, never its content: the tokens in it take over accounts.
Failures are logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from auth.config import Settings

logger = logging.getLogger("auth.mail")


def duration(seconds: int) -> str:
    """`86400` -> "24 hours", `1800` -> "30 minutes"."""
    if seconds >= 7200:
        return f"{seconds // 3600} hours"
    return f"{max(1, seconds // 60)} minutes"


def token_instructions(*, token: str, link: str | None, endpoint: str) -> str:
    """Where the token goes: the configured page (`?token=` appended), else the API."""
    if link:
        return f"Open {link}{'&' if '?' in link else '?'}token={token}"
    return f"Send this token to POST {endpoint}:\n\n{token}"


def plain_message(*, sender: str, to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    return message


def welcome_message(
    *, sender: str, to: str, display_name: str, token: str, link: str | None, valid_for: str
) -> EmailMessage:
    where = token_instructions(token=token, link=link, endpoint="/auth/email/verify")
    return plain_message(
        sender=sender,
        to=to,
        subject="Welcome to Bazaar: confirm your email address",
        text=(
            f"Hello {display_name},\n\nyour Bazaar account {to} is ready. Welcome aboard.\n\n"
            f"To confirm that this address is yours: {where}\n\nIt works once, within {valid_for}."
            " If you did not sign up, ignore this email.\n"
        ),
    )


def verification_message(
    *, sender: str, to: str, token: str, link: str | None, valid_for: str
) -> EmailMessage:
    where = token_instructions(token=token, link=link, endpoint="/auth/email/verify")
    return plain_message(
        sender=sender,
        to=to,
        subject="Confirm your Bazaar email address",
        text=(
            f"Someone asked to confirm the email address of the Bazaar account {to}.\n\n"
            f"{where}\n\nIt works once, within {valid_for}. If it was not you, ignore "
            "this email.\n"
        ),
    )


def send_over_smtp(url: str, message: EmailMessage, *, timeout: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port
    client: smtplib.SMTP
    if parts.scheme == "smtps":
        client = smtplib.SMTP_SSL(host, port or 465, timeout=timeout)
    else:
        client = smtplib.SMTP(host, port or 25, timeout=timeout)
    with client:
        if parse_qs(parts.query).get("starttls") == ["1"]:
            client.starttls()
        if parts.username:
            client.login(unquote(parts.username), unquote(parts.password or ""))
        client.send_message(message)


def reset_message(
    *, sender: str, to: str, token: str, link: str | None, minutes: int
) -> EmailMessage:
    where = (
        token_instructions(token=token, link=link, endpoint="/auth/password/reset")
        if link
        else f"Send this token with your new password to POST /auth/password/reset:\n\n{token}"
    )
    return plain_message(
        sender=sender,
        to=to,
        subject="Reset your Bazaar password",
        text=(
            f"Someone asked to reset the password of the Bazaar account {to}.\n\n"
            f"{where}\n\nIt works once, within {minutes} minutes. If it was not you, ignore "
            "this email: your password stays as it is.\n"
        ),
    )


async def deliver(*, settings: Settings, message: EmailMessage, what: str) -> None:
    """Sends over SMTP in a worker thread; a failure is logged, never raised
    (the response has gone). Without `SMTP_URL` only the fact is logged."""
    to = message["To"]
    if settings.smtp_url is None:
        logger.warning("%s email to %s not sent: SMTP_URL is not set", what, to)
        return
    try:
        await asyncio.to_thread(
            send_over_smtp,
            settings.smtp_url.get_secret_value(),
            message,
            timeout=settings.smtp_timeout_seconds,
        )
    except Exception as error:  # noqa: BLE001 - a lost email never fails the request
        logger.warning("%s email to %s failed: %s", what, to, error)
    else:
        logger.info("%s email sent to %s", what, to)


async def send_welcome_email(
    *, settings: Settings, to: str, display_name: str, verification_token: str
) -> None:
    message = welcome_message(
        sender=settings.mail_from,
        to=to,
        display_name=display_name,
        token=verification_token,
        link=settings.verification_page,
        valid_for=duration(settings.email_verification_ttl_seconds),
    )
    await deliver(settings=settings, message=message, what="welcome")


async def send_verification_email(*, settings: Settings, to: str, token: str) -> None:
    message = verification_message(
        sender=settings.mail_from,
        to=to,
        token=token,
        link=settings.verification_page,
        valid_for=duration(settings.email_verification_ttl_seconds),
    )
    await deliver(settings=settings, message=message, what="email verification")


async def send_reset_email(*, settings: Settings, to: str, token: str) -> None:
    message = reset_message(
        sender=settings.mail_from,
        to=to,
        token=token,
        link=settings.reset_page,
        minutes=settings.password_reset_ttl_seconds // 60,
    )
    await deliver(settings=settings, message=message, what="password reset")
