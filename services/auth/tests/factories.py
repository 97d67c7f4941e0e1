"""Small typed helpers that make users and log them in through the API."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Account:
    id: str
    email: str
    password: str
    display_name: str


@dataclass
class Tokens:
    access: str
    refresh: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


async def register(client: httpx.AsyncClient, **overrides: Any) -> Account:
    body = {
        "email": unique_email(),
        "password": "correct horse battery",
        "display_name": "Ada Lovelace",
        **overrides,
    }
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    return Account(created["id"], created["email"], body["password"], created["display_name"])


async def login(client: httpx.AsyncClient, email: str, password: str) -> Tokens:
    response = await client.post("/auth/token", data={"username": email, "password": password})
    assert response.status_code == 200, response.text
    body = response.json()
    return Tokens(body["access_token"], body["refresh_token"])


async def registered_and_logged_in(client: httpx.AsyncClient) -> tuple[Account, Tokens]:
    account = await register(client)
    return account, await login(client, account.email, account.password)
