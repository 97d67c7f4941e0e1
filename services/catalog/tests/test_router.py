from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from kit_testing import TokenMinter

from .factories import create_category, create_product, product_body, unique_name

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "instance"} <= body.keys()
    return body


def error_locs(body: dict[str, Any]) -> list[list[Any]]:
    return [error["loc"] for error in body["errors"]]


async def test_create_returns_the_stored_product(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/catalog/products",
        json={"name": "  red apple pie ", "price": 19.99, "tags": ["Fruit", " fruit", "pie"]},
        headers=admin_headers,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "Red Apple Pie"
    assert body["price"] == "19.99"
    assert body["price_with_tax"] == "21.99"
    assert body["tags"] == ["fruit", "pie"]
    assert body["category"] is None
    assert body["version"] == 1
    assert response.headers["location"] == f"/catalog/products/{body['id']}"
    assert response.headers["etag"] == '"1"'


async def test_tags_default_to_empty_and_price_gets_two_places(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/catalog/products", json={"name": "plain bread", "price": "3"}, headers=admin_headers
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["tags"], body["price"], body["price_with_tax"]) == ([], "3.00", "3.30")


async def test_price_with_tax_rounds_half_up(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers, price="0.05")
    assert created["price_with_tax"] == "0.06"  # 0.055 -> 0.06


async def test_get_returns_the_product_with_its_etag(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.get(f"/catalog/products/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == '"1"'


async def test_get_unknown_id_is_404(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get(f"/catalog/products/{uuid.uuid4()}"), 404)
    assert body["detail"] == "No product with this id"


async def test_get_malformed_id_is_422(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/catalog/products/not-a-uuid"), 422)
    assert error_locs(body) == [["path", "product_id"]]


async def test_list_shows_created_products(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.get("/catalog/products", params={"q": created["name"]})
    assert response.status_code == 200
    assert response.json() == {"items": [created], "next_cursor": None}


@pytest.mark.parametrize(
    ("overrides", "loc", "error_type"),
    [
        ({"name": " a "}, ["body", "name"], "string_too_short"),
        ({"name": "x" * 101}, ["body", "name"], "string_too_long"),
        ({"name": "apple pie"}, ["body", "name"], "name_has_digits"),
        ({"price": "0"}, ["body", "price"], "greater_than"),
        ({"price": "-1.00"}, ["body", "price"], "greater_than"),
        ({"price": "1.001"}, ["body", "price"], "decimal_max_places"),
        ({"price": "NaN"}, ["body", "price"], "finite_number"),
        ({"price": "cheap"}, ["body", "price"], "decimal_parsing"),
        ({"tags": "sale"}, ["body", "tags"], "list_type"),
        ({"tags": [""]}, ["body", "tags", 0], "string_too_short"),
        ({"tags": ["sale"], "price": "100.01"}, ["body", "price"], "sale_price_too_high"),
        ({"category": "Not A Slug"}, ["body", "category"], "string_pattern_mismatch"),
        ({"colour": "red"}, ["body", "colour"], "extra_forbidden"),
    ],
)
async def test_each_product_rule_is_a_422_naming_the_field(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    overrides: dict[str, Any],
    loc: list[Any],
    error_type: str,
) -> None:
    body = product_body(**overrides)
    if overrides.get("name") == "apple pie":
        body["name"] = "apple pie 2"
    response = await client.post("/catalog/products", json=body, headers=admin_headers)
    problem = assert_problem(response, 422)
    assert [(error["loc"], error["type"]) for error in problem["errors"]] == [(loc, error_type)]
    assert ".".join(str(part) for part in loc) in problem["detail"]


async def test_name_is_required(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    response = await client.post("/catalog/products", json={"price": "1"}, headers=admin_headers)
    assert error_locs(assert_problem(response, 422)) == [["body", "name"]]


async def test_sale_product_at_exactly_one_hundred_is_allowed(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers, tags=["SALE"], price="100")
    assert (created["tags"], created["price"]) == (["sale"], "100.00")


async def test_create_without_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/catalog/products", json=product_body())
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert body["detail"] == "A bearer token is required"


async def test_create_with_a_bad_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/catalog/products", json=product_body(), headers={"Authorization": "Bearer nonsense"}
    )
    assert assert_problem(response, 401)["detail"] == "Malformed token"


async def test_create_with_an_expired_token_is_401(
    client: httpx.AsyncClient, minter: TokenMinter
) -> None:
    token = minter.token(roles=("admin",), lifetime=-60)
    response = await client.post(
        "/catalog/products", json=product_body(), headers={"Authorization": f"Bearer {token}"}
    )
    assert assert_problem(response, 401)["detail"] == "Token expired"


async def test_create_without_admin_role_is_403(
    client: httpx.AsyncClient, user_headers: dict[str, str]
) -> None:
    response = await client.post("/catalog/products", json=product_body(), headers=user_headers)
    assert assert_problem(response, 403)["detail"] == "The 'admin' role is required"


async def test_duplicate_name_in_a_category_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_category(client, admin_headers, "bakery")
    await create_product(client, admin_headers, name="rye bread", category="bakery")
    response = await client.post(
        "/catalog/products",
        json=product_body(name="RYE  bread".replace("  ", " "), category="bakery"),
        headers=admin_headers,
    )
    body = assert_problem(response, 409)
    assert body["detail"] == "A product with this name already exists in its category"


async def test_same_name_in_another_category_is_allowed(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_category(client, admin_headers, "bakery")
    await create_category(client, admin_headers, "deli")
    first = await create_product(client, admin_headers, name="rye bread", category="bakery")
    second = await create_product(client, admin_headers, name="rye bread", category="deli")
    assert first["category"]["slug"] == "bakery"
    assert second["category"] == {"id": second["category"]["id"], "slug": "deli", "name": "Deli"}


async def test_duplicate_name_without_category_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_product(client, admin_headers, name="loose tea")
    response = await client.post(
        "/catalog/products", json=product_body(name="Loose Tea"), headers=admin_headers
    )
    assert_problem(response, 409)


async def test_unknown_category_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/catalog/products", json=product_body(category="nowhere"), headers=admin_headers
    )
    body = assert_problem(response, 422)
    assert body["errors"] == [
        {
            "loc": ["body", "category"],
            "msg": "No category with this slug",
            "type": "unknown_category",
        }
    ]


# --- categories -------------------------------------------------------------------------


async def test_categories_are_created_by_admins_and_listed(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    fruit = await create_category(client, admin_headers, "fruit", "Fresh Fruit")
    apples = await create_category(client, admin_headers, "apples")
    response = await client.get("/catalog/categories")
    assert response.status_code == 200
    assert response.json() == [apples, fruit]
    assert fruit == {"id": fruit["id"], "slug": "fruit", "name": "Fresh Fruit"}


async def test_duplicate_category_slug_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_category(client, admin_headers, "fruit")
    response = await client.post(
        "/catalog/categories", json={"slug": "fruit", "name": "Other"}, headers=admin_headers
    )
    assert assert_problem(response, 409)["detail"] == "A category with this slug already exists"


async def test_category_needs_admin(
    client: httpx.AsyncClient, user_headers: dict[str, str]
) -> None:
    payload = {"slug": "fruit", "name": "Fruit"}
    assert_problem(await client.post("/catalog/categories", json=payload), 401)
    assert_problem(
        await client.post("/catalog/categories", json=payload, headers=user_headers), 403
    )


async def test_category_slug_is_validated(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/catalog/categories", json={"slug": "-bad-", "name": "Bad"}, headers=admin_headers
    )
    assert error_locs(assert_problem(response, 422)) == [["body", "slug"]]


async def test_product_carries_its_category(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    category = await create_category(client, admin_headers, "fruit", "Fruit")
    created = await create_product(client, admin_headers, category="fruit")
    assert created["category"] == category
    fetched = (await client.get(f"/catalog/products/{created['id']}")).json()
    assert fetched["category"] == category


async def test_unique_name_helper_has_no_digits() -> None:
    assert not any(character.isdigit() for character in unique_name())
