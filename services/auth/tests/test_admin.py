"""The admin command line: what an operator types, and what it does to accounts."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

import httpx
import pytest
from jose import jwt

from auth import admin

from .conftest import SERVICE_DIR
from .factories import login, register, registered_and_logged_in, unique_email


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


class AdminCommand(Protocol):
    def __call__(self, *arguments: str, stdin: str = "") -> Awaitable[Done]: ...


@pytest.fixture
def admin_command(
    database_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> AdminCommand:
    """`python -m auth.admin` in this process (a new interpreter per command
    costs seconds of imports); one test runs the real module as a process."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)

    async def run(*arguments: str, stdin: str = "") -> Done:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        returncode = await asyncio.to_thread(admin.main, arguments)
        captured = capsys.readouterr()
        return Done(returncode, captured.out, captured.err)

    return run


async def test_the_module_runs_as_a_command(
    client: httpx.AsyncClient, database_url: str, redis_url: str
) -> None:
    email = unique_email("ops")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "auth.admin", "create-admin", email],
        cwd=SERVICE_DIR,
        env={**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    created, shown = done.stdout.splitlines()
    assert created == f"admin {email} created"
    password = shown.removeprefix("generated password (shown only now): ")
    assert len(password) >= 20
    await login(client, email, password)


async def test_create_admin_with_a_password_from_stdin(
    client: httpx.AsyncClient, admin_command: AdminCommand
) -> None:
    email = unique_email("ops")
    done = await admin_command(
        "create-admin", email, "--name", "Ops", "--password-stdin", stdin="piped password\n"
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"admin {email} created\n"
    tokens = await login(client, email, "piped password")
    claims = jwt.get_unverified_claims(tokens.access)
    assert claims["roles"] == ["admin", "user"]
    assert claims["email_verified"] is True
    assert claims["name"] == "Ops"


async def test_create_admin_promotes_an_existing_account_keeping_its_password(
    client: httpx.AsyncClient, admin_command: AdminCommand
) -> None:
    account = await register(client)
    done = await admin_command("create-admin", account.email.upper())

    assert done.returncode == 0, done.stderr
    assert "is now an admin" in done.stdout
    tokens = await login(client, account.email, account.password)
    assert "admin" in jwt.get_unverified_claims(tokens.access)["roles"]
    listed = await admin_command("list-admins")
    assert f"{account.email}\tactive" in listed.stdout.splitlines()


async def test_set_password_ends_every_session(
    client: httpx.AsyncClient, admin_command: AdminCommand
) -> None:
    account, tokens = await registered_and_logged_in(client)
    done = await admin_command(
        "set-password", account.email, "--password-stdin", stdin="set by an operator\n"
    )

    assert done.returncode == 0, done.stderr
    assert (await client.get("/auth/users/me", headers=tokens.headers)).status_code == 401
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert refreshed.status_code == 401
    old = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert old.status_code == 400  # invalid_grant
    await login(client, account.email, "set by an operator")


async def test_deactivate_ends_every_session_and_activate_lets_the_account_back(
    client: httpx.AsyncClient, admin_command: AdminCommand
) -> None:
    account, tokens = await registered_and_logged_in(client)

    done = await admin_command("deactivate", account.email)
    assert done.returncode == 0, done.stderr
    assert (await client.get("/auth/users/me", headers=tokens.headers)).status_code == 401
    refused = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert refused.status_code == 400  # invalid_grant
    assert refused.json()["error"] == "invalid_grant"

    done = await admin_command("activate", account.email)
    assert done.returncode == 0, done.stderr
    await login(client, account.email, account.password)


async def test_bad_requests_fail_with_a_message(admin_command: AdminCommand) -> None:
    unknown = await admin_command("deactivate", unique_email("ghost"))
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("no account with the email ghost-")

    short = await admin_command(
        "create-admin", unique_email("ops"), "--password-stdin", stdin="short\n"
    )
    assert short.returncode == 1
    assert short.stderr == "error: a password has 8 to 1024 characters\n"
