"""Account administration from the command line, for operators.

    docker compose run --rm auth python -m auth.admin create-admin ada@example.com
    docker compose run --rm auth python -m auth.admin set-password ada@example.com
    docker compose run --rm auth python -m auth.admin deactivate mallory@example.com
    docker compose run --rm auth python -m auth.admin activate mallory@example.com
    docker compose run --rm auth python -m auth.admin list-admins

It reads auth's own settings (DATABASE_URL, REDIS_URL and their passwords).
A password is read from standard input with `--password-stdin`, asked for
twice on a terminal, or else generated and printed once. Setting a password
or deactivating an account ends every session of the account at once.
Accounts made here are admins with a verified address: an operator vouches
for them.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from auth import service
from auth.config import Settings
from auth.errors import EmailTaken, UserNotFound
from auth.models import ROLE_ADMIN, ROLE_USER, User
from auth.passwords import Passwords
from auth.schemas import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    PASSWORD_IS_EMAIL,
    is_the_email,
    normalise_email,
)
from kit.db import make_engine, make_sessionmaker
from kit.errors import DomainError


class CommandError(Exception):
    """Ends the command with this message and exit status 1."""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m auth.admin",
        description="Administer Bazaar accounts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-admin", help="create an admin, or make an account one")
    create.add_argument("email")
    create.add_argument("--name", default="Administrator", help="display name of a new account")
    create.add_argument("--password-stdin", action="store_true", help="read the password")
    set_password = commands.add_parser("set-password", help="set a password; ends every session")
    set_password.add_argument("email")
    set_password.add_argument("--password-stdin", action="store_true", help="read the password")
    for name, text in (
        ("activate", "let an account log in again"),
        ("deactivate", "stop an account; ends every session"),
    ):
        commands.add_parser(name, help=text).add_argument("email")
    commands.add_parser("list-admins", help="every admin account")
    return root


def read_password(*, from_stdin: bool) -> tuple[str, bool]:
    """The new password and whether it was generated (and must be shown)."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ")
    else:
        return secrets.token_urlsafe(18), True
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise CommandError(
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )
    return password, False


def say(text: str) -> None:
    print(text)  # noqa: T201 - the command's output


async def run(arguments: argparse.Namespace, settings: Settings) -> None:
    engine = make_engine(str(settings.database_url), pool_size=1, max_overflow=0)
    redis = Redis.from_url(str(settings.redis_url))
    passwords = Passwords.from_settings(settings)
    try:
        async with make_sessionmaker(engine)() as session:
            command = arguments.command
            if command == "list-admins":
                admins = await session.scalars(
                    select(User).where(User.roles.contains([ROLE_ADMIN])).order_by(User.email)
                )
                for admin in admins:
                    say(f"{admin.email}\t{'active' if admin.is_active else 'deactivated'}")
                return
            email = normalise_email(arguments.email)
            if command == "create-admin":
                await create_admin(arguments, session=session, passwords=passwords, email=email)
                return
            user = await service.find_user(session=session, email=email)
            if command == "set-password":
                password, generated = read_password(from_stdin=arguments.password_stdin)
                await service.set_password(
                    session=session,
                    redis=redis,
                    passwords=passwords,
                    settings=settings,
                    user=user,
                    password=password,
                )
                say(f"password of {email} set; every session of the account has ended")
                if generated:
                    say(f"generated password (shown only now): {password}")
            else:
                active = command == "activate"
                await service.set_active(
                    session=session, redis=redis, settings=settings, user=user, active=active
                )
                say(f"{email} {'activated' if active else 'deactivated'}")
    finally:
        await redis.aclose()
        await engine.dispose()


async def create_admin(
    arguments: argparse.Namespace, *, session: AsyncSession, passwords: Passwords, email: str
) -> None:
    existing = await session.scalar(select(User).where(User.email == email))
    if existing is not None:
        existing.roles = sorted({*existing.roles, ROLE_ADMIN})
        existing.email_verified_at = existing.email_verified_at or datetime.now(UTC)
        await session.commit()
        say(f"{email} is now an admin (its password is unchanged)")
        return
    password, generated = read_password(from_stdin=arguments.password_stdin)
    if is_the_email(password, email):
        raise CommandError(PASSWORD_IS_EMAIL)
    try:
        user, _ = await service.register(
            session=session,
            passwords=passwords,
            email=email,
            password=password,
            display_name=arguments.name,
            roles=(ROLE_ADMIN, ROLE_USER),
        )
    except EmailTaken as error:
        raise CommandError(f"{email} was registered meanwhile; run the command again") from error
    user.email_verified_at = datetime.now(UTC)
    await session.commit()
    say(f"admin {email} created")
    if generated:
        say(f"generated password (shown only now): {password}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        asyncio.run(run(arguments, Settings()))
    except UserNotFound:
        print(f"no account with the email {arguments.email}", file=sys.stderr)  # noqa: T201
        return 1
    except (CommandError, DomainError, ValidationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    except (OSError, SQLAlchemyError, RedisError) as error:
        print(f"error: the database or Redis cannot be reached: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
