"""Small typed helpers that create what a test needs through the API."""

from __future__ import annotations

import itertools
import string
from typing import Any

import httpx

_sequence = itertools.count()


def unique_name(prefix: str = "Item") -> str:
    """A product name no other test uses (names may not contain digits)."""
    number = next(_sequence)
    letters = ""
    while True:
        number, digit = divmod(number, 26)
        letters += string.ascii_lowercase[digit]
        if number == 0:
            break
    return f"{prefix} {letters}"


def product_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": unique_name(), "price": "10.00", "tags": []}
    body.update(overrides)
    return body


async def create_product(
    client: httpx.AsyncClient, headers: dict[str, str], **overrides: Any
) -> dict[str, Any]:
    response = await client.post(
        "/catalog/products", json=product_body(**overrides), headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def create_category(
    client: httpx.AsyncClient, headers: dict[str, str], slug: str, name: str | None = None
) -> dict[str, Any]:
    response = await client.post(
        "/catalog/categories", json={"slug": slug, "name": name or slug.title()}, headers=headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created
