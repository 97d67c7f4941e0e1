"""The welcome email, sent after the registration response has gone out.

With `SMTP_URL` (`smtp://user:password@host:port`, or `smtps://` for implicit
TLS; `?starttls=1` upgrades a plain connection) it goes over SMTP in a worker
thread; without one it is logged. Failures are logged, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from auth.config import Settings

logger = logging.getLogger("auth.mail")


def welcome_message(*, sender: str, to: str, display_name: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "Welcome to Bazaar"
    message.set_content(
        f"Hello {display_name},\n\nyour Bazaar account {to} is ready. Welcome aboard.\n"
    )
    return message


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


async def send_welcome_email(*, settings: Settings, to: str, display_name: str) -> None:
    message = welcome_message(sender=settings.mail_from, to=to, display_name=display_name)
    if settings.smtp_url is None:
        logger.info("welcome email (no SMTP_URL set) to %s:\n%s", to, message.get_content())
        return
    try:
        await asyncio.to_thread(
            send_over_smtp,
            settings.smtp_url.get_secret_value(),
            message,
            timeout=settings.smtp_timeout_seconds,
        )
    except Exception as error:  # noqa: BLE001 - a lost email never fails a registration
        logger.warning("welcome email to %s failed: %s", to, error)
    else:
        logger.info("welcome email sent to %s", to)
