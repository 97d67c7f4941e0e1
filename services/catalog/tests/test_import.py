"""POST /catalog/products:import: the machine import, by client token or API key."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from catalog.models import Product
from kit_testing import TokenMinter

from .conftest import IMPORT_KEY, app_client
from .factories import create_category, create_product, product_body
from .test_router import assert_problem

IMPORT = "/catalog/products:import"
KEY = {"X-API-Key": IMPORT_KEY}


async def stored(session: AsyncSession, rows: list[dict[str, Any]]) -> int:
    """How many of these rows' names are stored (other tests commit products too)."""
    names = [row["name"].title() for row in rows]
    return int(await session.scalar(select(func.count()).where(Product.name.in_(names))) or 0)


async def test_import_creates_every_product(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    await create_category(client, admin_headers, "fruit")
    rows = [product_body(category="fruit" if index % 2 else None) for index in range(1000)]
    response = await client.post(IMPORT, json=rows, headers=KEY)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["count"] == 1000
    assert len(set(body["ids"])) == 1000
    fetched = (await client.get(f"/catalog/products/{body['ids'][1]}")).json()
    assert (fetched["name"], fetched["category"]["slug"]) == (rows[1]["name"].title(), "fruit")
    assert await stored(session, rows) == 1000


async def test_import_never_takes_the_key_from_the_query(client: httpx.AsyncClient) -> None:
    response = await client.post(IMPORT, params={"api_key": IMPORT_KEY}, json=[product_body()])
    assert_problem(response, 401)
    assert response.json()["detail"] == (
        "An API key (X-API-Key) or a bearer token with the catalog:import scope is required"
    )


async def test_import_without_credentials_or_with_a_wrong_key_is_401(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.post(IMPORT, json=[product_body()])
    assert_problem(missing, 401)
    assert missing.headers["www-authenticate"] == 'APIKey, Bearer scope="catalog:import"'
    response = await client.post(IMPORT, json=[product_body()], headers={"X-API-Key": "wrong"})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "APIKey"


async def test_import_takes_a_machine_clients_token_with_the_import_scope(
    client: httpx.AsyncClient, minter: TokenMinter, session: AsyncSession
) -> None:
    token = minter.token(
        user_id="catalog-importer",
        roles=(),
        client_id="catalog-importer",
        scope="catalog:read catalog:import",
    )
    rows = [product_body() for _ in range(3)]
    response = await client.post(IMPORT, json=rows, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.text
    assert response.json()["count"] == 3
    assert await stored(session, rows) == 3


async def test_a_token_without_the_import_scope_is_403(
    client: httpx.AsyncClient, minter: TokenMinter, admin_headers: dict[str, str]
) -> None:
    """An admin's own token is not an import credential: only the scope is."""
    other_scope = minter.token(user_id="reports", roles=(), scope="catalog:read")
    for headers in (admin_headers, {"Authorization": f"Bearer {other_scope}"}):
        response = await client.post(IMPORT, json=[product_body()], headers=headers)
        body = assert_problem(response, 403)
        assert body["error"] == "insufficient_scope"
        assert response.headers["www-authenticate"] == (
            'Bearer error="insufficient_scope", scope="catalog:import"'
        )


async def test_an_invalid_token_is_401_even_next_to_a_good_key(
    client: httpx.AsyncClient, minter: TokenMinter
) -> None:
    expired = minter.token(scope="catalog:import", lifetime=-60)
    response = await client.post(
        IMPORT, json=[product_body()], headers={**KEY, "Authorization": f"Bearer {expired}"}
    )
    assert assert_problem(response, 401)["detail"] == "Token expired"


async def test_import_is_all_or_nothing_with_per_row_errors(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    rows = [product_body() for _ in range(5)]
    rows[3]["price"] = "-2"
    rows[4]["name"] = "n"
    response = await client.post(IMPORT, json=rows, headers=KEY)
    problem = assert_problem(response, 422)
    assert [(error["loc"], error["type"]) for error in problem["errors"]] == [
        (["body", 3, "price"], "greater_than"),
        (["body", 4, "name"], "string_too_short"),
    ]
    assert await stored(session, rows) == 0


async def test_import_reports_unknown_categories_per_row(
    client: httpx.AsyncClient, session: AsyncSession
) -> None:
    rows = [product_body(), product_body(category="nowhere")]
    problem = assert_problem(await client.post(IMPORT, json=rows, headers=KEY), 422)
    assert problem["errors"] == [
        {
            "loc": ["body", 1, "category"],
            "msg": "No category with this slug",
            "type": "unknown_category",
        }
    ]
    assert await stored(session, rows) == 0


async def test_import_duplicates_are_409_per_row(
    client: httpx.AsyncClient, admin_headers: dict[str, str], session: AsyncSession
) -> None:
    existing = await create_product(client, admin_headers)
    repeated = product_body()
    rows: list[dict[str, Any]] = [
        product_body(),
        product_body(name=existing["name"]),
        repeated,
        dict(repeated),
    ]
    problem = assert_problem(await client.post(IMPORT, json=rows, headers=KEY), 409)
    assert [error["loc"] for error in problem["errors"]] == [
        ["body", 1, "name"],
        ["body", 3, "name"],
    ]
    assert await stored(session, rows) == 1


async def test_import_bounds_the_list(client: httpx.AsyncClient) -> None:
    too_many = [product_body() for _ in range(1001)]
    assert assert_problem(await client.post(IMPORT, json=too_many, headers=KEY), 422)["errors"][0][
        "loc"
    ] == ["body"]
    assert assert_problem(await client.post(IMPORT, json=[], headers=KEY), 422)["errors"][0][
        "loc"
    ] == ["body"]


async def test_import_is_disabled_without_a_configured_key(settings: Any, minter: Any) -> None:

    # no Redis either: the key check comes before anything else
    async with app_client(
        settings, minter, catalog_api_key=None, redis_url="redis://127.0.0.1:9/0"
    ) as client:
        response = await client.post(IMPORT, json=[product_body()], headers=KEY)
    assert assert_problem(response, 403)["detail"].startswith(
        "Import by API key is disabled: no key is configured"
    )


async def test_openapi_documents_the_import_key(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"][IMPORT]["post"]
    assert {name for entry in operation["security"] for name in entry} == {
        "APIKeyHeader",
        "ImportClient",
    }
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The catalog import key",
    }
    assert "APIKeyQuery" not in schemes
    flow = schemes["ImportClient"]["flows"]["clientCredentials"]
    assert flow == {"tokenUrl": "/auth/token", "scopes": {"catalog:import": "Import products"}}
    assert {"ImportClient": ["catalog:import"]} in operation["security"]
