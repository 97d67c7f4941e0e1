"""What auth emails, over a real SMTP server, and what it logs without one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from auth.config import Settings
from auth.main import create_app
from kit_testing import MailCatcher, emailed_token, free_port, started

from .conftest import CHEAP_ARGON2, make_settings, wait_until_ready
from .factories import register, unique_email


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        started(create_app(settings)) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(manager.app), base_url="http://auth"
        ) as client,
    ):
        await wait_until_ready(client)
        yield client


@pytest.fixture
def mail_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """auth.mail's records; the app's logging set-up replaced the root
    handlers, caplog's included, so it listens on the logger itself."""
    logger = logging.getLogger("auth.mail")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="auth.mail")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def messages(log: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    unique = {id(record): record for record in log.records}.values()
    return [(record.levelname, record.getMessage()) for record in unique]


async def test_the_welcome_email_carries_a_verification_token(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    email = unique_email()
    await register(client, email=email, display_name="Linus")

    (message,) = await mail.wait_for(email)

    assert message["Subject"] == "Welcome to Bazaar: confirm your email address"
    assert message["From"] == "Bazaar <no-reply@bazaar.invalid>"
    assert "Hello Linus" in message.get_content()
    # unless EMAIL_VERIFICATION_LINK says otherwise, the web client's page
    token = emailed_token(message)
    assert f"http://localhost:8000/email/verify?token={token}" in message.get_content()
    assert len(token) == 43


async def test_a_configured_page_gets_the_token_in_its_link(
    database_url: str, redis_url: str, mail: MailCatcher
) -> None:
    settings = make_settings(
        database_url,
        redis_url,
        smtp_url=mail.url,
        email_verification_link="https://shop.example/verify?lang=en",
    )
    async with app_client(settings) as client:
        account = await register(client)

    (message,) = await mail.wait_for(account.email)
    token = emailed_token(message)
    assert f"Open https://shop.example/verify?lang=en&token={token}" in message.get_content()


async def test_without_smtp_the_log_says_who_and_what_and_holds_no_secret(
    database_url: str, redis_url: str, mail_log: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(database_url, redis_url, smtp_url=None)
    async with app_client(settings) as client:
        account = await register(client, display_name="Quiet Person")
        forgot = await client.post("/auth/password/forgot", json={"email": account.email})
        assert forgot.status_code == 202
        resend = await client.post("/auth/email/verify/resend", json={"email": account.email})
        assert resend.status_code == 202

    assert messages(mail_log) == [
        ("WARNING", f"welcome email to {account.email} not sent: SMTP_URL is not set"),
        ("WARNING", f"password reset email to {account.email} not sent: SMTP_URL is not set"),
        (
            "WARNING",
            f"email verification email to {account.email} not sent: SMTP_URL is not set",
        ),
    ]


async def test_a_failing_mail_server_never_fails_the_registration(
    database_url: str, redis_url: str, mail_log: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        database_url, redis_url, smtp_url=f"smtp://127.0.0.1:{free_port()}", **CHEAP_ARGON2
    )
    async with app_client(settings) as client:
        account = await register(client)

    ((level, text),) = messages(mail_log)
    assert level == "WARNING"
    assert text.startswith(f"welcome email to {account.email} failed: ")
