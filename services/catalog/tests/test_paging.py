"""GET /catalog/products: keyset pages, sorts, filters and their cost."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection

from catalog.deps import pagination
from catalog.paging import Pagination, Sort

from .conftest import IMPORT_KEY
from .factories import create_category, product_body, unique_name
from .test_router import assert_problem, error_locs

LIST = "/catalog/products"
IMPORT = "/catalog/products:import"


def new_tag() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def import_rows(client: httpx.AsyncClient, rows: list[dict[str, Any]]) -> list[str]:
    response = await client.post(IMPORT, json=rows, headers={"X-API-Key": IMPORT_KEY})
    assert response.status_code == 201, response.text
    ids: list[str] = response.json()["ids"]
    return ids


async def walk(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Follows `next_cursor` from the first page to the last."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(LIST, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def seeded(client: httpx.AsyncClient, count: int, **overrides: Any) -> tuple[str, list[str]]:
    """`count` products under a fresh tag, many sharing a price (ties cross pages)."""
    tag = new_tag()
    rows = [
        product_body(price=str(Decimal(index % 4 + 1)), tags=[tag], **overrides)
        for index in range(count)
    ]
    return tag, await import_rows(client, rows)


async def test_default_page_is_twenty_with_a_cursor(client: httpx.AsyncClient) -> None:
    tag, ids = await seeded(client, 25)
    first = (await client.get(LIST, params={"tag": tag})).json()
    assert len(first["items"]) == 20
    assert isinstance(first["next_cursor"], str)
    second = (await client.get(LIST, params={"tag": tag, "cursor": first["next_cursor"]})).json()
    assert len(second["items"]) == 5
    assert second["next_cursor"] is None
    seen = [item["id"] for item in first["items"] + second["items"]]
    # default order: created_at, then id; one import's rows share created_at
    assert seen == sorted(ids)


@pytest.mark.parametrize("sort", [sort.value for sort in Sort])
async def test_walking_any_sort_returns_each_product_once_in_order(
    client: httpx.AsyncClient, sort: str
) -> None:
    tag, ids = await seeded(client, 23)
    walked = await walk(client, tag=tag, sort=sort, limit=4)
    whole = (await client.get(LIST, params={"tag": tag, "sort": sort, "limit": 100})).json()
    assert [item["id"] for item in walked] == [item["id"] for item in whole["items"]]
    assert sorted(item["id"] for item in walked) == sorted(ids)
    if sort.endswith("price"):
        keys = [(Decimal(item["price"]), item["id"]) for item in walked]
        assert keys == sorted(keys, reverse=sort.startswith("-"))


async def test_limit_is_bounded(client: httpx.AsyncClient) -> None:
    for limit in ("0", "101", "many"):
        problem = assert_problem(await client.get(LIST, params={"limit": limit}), 422)
        assert error_locs(problem) == [["query", "limit"]]
    assert (await client.get(LIST, params={"limit": 100})).status_code == 200


async def test_unknown_sort_is_422(client: httpx.AsyncClient) -> None:
    problem = assert_problem(await client.get(LIST, params={"sort": "colour"}), 422)
    assert error_locs(problem) == [["query", "sort"]]


def encoded(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "bm90IGpzb24",  # "not json"
        encoded({"a": 1}),
        encoded(["price", "cheap", str(uuid.uuid4())]),
        encoded(["price", "NaN", str(uuid.uuid4())]),
        encoded(["created_at", "2026-01-01T00:00:00", str(uuid.uuid4())]),
        encoded(["name", "Apple", "not-a-uuid"]),
        encoded(["size", "Apple", str(uuid.uuid4())]),
        encoded(["name", 5, str(uuid.uuid4())]),
        # text PostgreSQL cannot take, smuggled inside the opaque cursor
        encoded(["name", "Ap\x00ple", str(uuid.uuid4())]),
        base64.urlsafe_b64encode(
            b'["name", "\\ud800", "' + str(uuid.uuid4()).encode() + b'"]'
        ).decode(),
    ],
)
async def test_a_forged_cursor_is_422(client: httpx.AsyncClient, cursor: str) -> None:
    params = {"cursor": cursor, "sort": "price" if "price" in cursor else "name"}
    problem = assert_problem(await client.get(LIST, params=params), 422)
    assert problem["errors"][0]["loc"] == ["query", "cursor"]
    assert problem["errors"][0]["type"] == "invalid_cursor"


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"q": "\x00"}, ["query", "q"]),
        ({"tag": "a\x00"}, ["query", "tag"]),
        ({"category": "\x00"}, ["query", "category"]),
        ({"cursor": "\x00"}, ["query", "cursor"]),
    ],
)
async def test_a_nul_in_any_filter_is_a_422_naming_it(
    client: httpx.AsyncClient, params: dict[str, str], loc: list[str]
) -> None:
    problem = assert_problem(await client.get(LIST, params=params), 422)
    assert loc in error_locs(problem)


@pytest.mark.parametrize(
    ("sort", "raw"),
    [
        ("name", ["name", "Apple", 5]),
        ("name", ["name", "Apple", ["x"]]),
        ("name", ["name", "Apple", None]),
        ("name", ["name", "Apple", str(uuid.uuid4()), "more"]),
        ("price", ["price", "1E-20000", str(uuid.uuid4())]),
        ("price", ["price", "19.999", str(uuid.uuid4())]),
        ("price", ["price", "100000000.00", str(uuid.uuid4())]),
        ("price", ["price", "1E+400", str(uuid.uuid4())]),
        ("created_at", ["created_at", "0001-01-01T00:00:00+01:00", str(uuid.uuid4())]),
        ("created_at", ["created_at", "9999-12-31T23:59:59-01:00", str(uuid.uuid4())]),
    ],
)
async def test_a_cursor_no_page_could_end_with_is_422(
    client: httpx.AsyncClient, sort: str, raw: list[object]
) -> None:
    """Every part of the right kind, and a sort key its column could hold: a
    key beyond it would reach PostgreSQL, which refuses it."""
    response = await client.get(LIST, params={"cursor": encoded(raw), "sort": sort})
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["type"] == "invalid_cursor"
    assert problem["errors"][0]["msg"] == "The cursor is not one this API issued"
    assert response.headers["x-request-id"]


async def test_a_cursor_only_continues_its_own_sort(client: httpx.AsyncClient) -> None:
    tag, _ = await seeded(client, 3)
    page = (await client.get(LIST, params={"tag": tag, "sort": "price", "limit": 1})).json()
    response = await client.get(LIST, params={"cursor": page["next_cursor"], "sort": "-price"})
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["msg"] == "The cursor continues sort=price, not sort=-price"


async def test_filters_combine(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    await create_category(client, admin_headers, "tools")
    tag, other = new_tag(), new_tag()
    rows = [
        product_body(name="Big Hammer", price="30", tags=[tag, other], category="tools"),
        product_body(name="small hammer", price="10", tags=[tag], category="tools"),
        product_body(name="Hammer_Time", price="20", tags=[tag]),
        product_body(name="Saw", price="40", tags=[tag], category="tools"),
    ]
    await import_rows(client, rows)

    async def names(**params: Any) -> list[str]:
        response = await client.get(LIST, params={"tag": tag, "sort": "price", **params})
        assert response.status_code == 200, response.text
        return [item["name"] for item in response.json()["items"]]

    assert await names() == ["Small Hammer", "Hammer_Time", "Big Hammer", "Saw"]
    assert await names(q="HAMMER") == ["Small Hammer", "Hammer_Time", "Big Hammer"]
    assert await names(q="r_t") == ["Hammer_Time"]  # `_` is literal, not a wildcard
    assert await names(q="%") == []
    assert await names(category="tools") == ["Small Hammer", "Big Hammer", "Saw"]
    assert await names(category="nothing") == []
    assert await names(min_price="20", max_price="30") == ["Hammer_Time", "Big Hammer"]
    assert await names(tag=[tag, other]) == ["Big Hammer"]
    assert await names(q="hammer", category="tools", max_price="15") == ["Small Hammer"]
    items = (await client.get(LIST, params={"tag": tag, "category": "tools"})).json()["items"]
    assert {item["category"]["slug"] for item in items} == {"tools"}


async def test_price_bounds_are_compared_as_sent(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """Not rounded to the column's cents, and never refused for being beyond it."""
    tag, cheap, dear = new_tag(), unique_name("Cheap").title(), unique_name("Dear").title()
    await import_rows(
        client,
        [
            product_body(name=cheap, price="19.99", tags=[tag]),
            product_body(name=dear, price="20", tags=[tag]),
        ],
    )

    async def names(**params: str) -> list[str]:
        response = await client.get(LIST, params={"tag": tag, "sort": "price", **params})
        assert response.status_code == 200, response.text
        return [item["name"] for item in response.json()["items"]]

    assert await names(min_price="19.994") == [dear]
    assert await names(max_price="19.995") == [cheap]
    assert await names(min_price="19.99", max_price="20.00") == [cheap, dear]
    assert await names(max_price="100000000") == [cheap, dear]
    assert await names(min_price="100000000") == []
    assert await names(min_price="99999999999.9") == []


async def test_inverted_price_range_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get(LIST, params={"min_price": "5", "max_price": "1"})
    assert error_locs(assert_problem(response, 422)) == [["query", "min_price"]]


async def test_negative_price_filter_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get(LIST, params={"min_price": "-1"})
    assert error_locs(assert_problem(response, 422)) == [["query", "min_price"]]


@asynccontextmanager
async def counted_statements(connection: AsyncConnection) -> AsyncIterator[list[str]]:
    """Every statement the test's connection runs, through SQLAlchemy or on
    its driver connection directly (as the list reads do)."""
    statements: list[str] = []
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None

    def count(record: Any) -> None:
        statements.append(record.query)

    driver.add_query_logger(count)
    try:
        yield statements
    finally:
        driver.remove_query_logger(count)


async def test_a_page_costs_the_same_statements_whatever_its_size(
    client: httpx.AsyncClient, admin_headers: dict[str, str], connection: AsyncConnection
) -> None:
    for slug in ("alpha", "beta", "gamma"):
        await create_category(client, admin_headers, slug)
    tag = new_tag()
    rows = [
        product_body(tags=[tag], category=("alpha", "beta", "gamma")[index % 3])
        for index in range(60)
    ]
    await import_rows(client, rows)
    counts = {}
    for limit in (2, 60):
        async with counted_statements(connection) as statements:
            response = await client.get(LIST, params={"tag": tag, "limit": limit})
        assert len(response.json()["items"]) == limit
        assert all(item["category"] is not None for item in response.json()["items"])
        counts[limit] = statements
    assert len(counts[2]) == len(counts[60])
    selects = [statement for statement in counts[60] if statement.lstrip().startswith("SELECT")]
    assert len(selects) == 1
    assert "LEFT OUTER JOIN categories" in selects[0]


async def test_pagination_dependency_can_be_overridden(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """The route takes its page from the dependency, whatever the query says."""
    tag, _ = await seeded(client, 3)
    app.dependency_overrides[pagination] = lambda: Pagination(
        limit=1, sort=Sort.PRICE_DESC, cursor=None
    )
    try:
        response = await client.get(LIST, params={"tag": tag, "limit": 50, "sort": "name"})
    finally:
        app.dependency_overrides.pop(pagination)
    page = response.json()
    assert response.status_code == 200
    assert [item["price"] for item in page["items"]] == ["3.00"]
    assert page["next_cursor"] is not None


async def test_walk_sees_every_existing_product_once_while_others_are_inserted(
    committed_client: httpx.AsyncClient,
) -> None:
    tag, ids = await seeded(committed_client, 60)
    pages = 0
    inserted: list[str] = []
    progress = asyncio.Condition()
    done = asyncio.Event()

    async def insert_meanwhile() -> None:
        while not done.is_set():
            # names and prices land before and after the walker's position
            rows = [
                product_body(name=unique_name(prefix), price=price, tags=[tag])
                for prefix, price in (("Aaa", "1"), ("Zzz", "4"), ("Mmm", "2.5"))
            ]
            new = await import_rows(committed_client, rows)
            async with progress:
                inserted.extend(new)
                progress.notify_all()

    async def inserts_after(goal: int) -> None:
        async with progress:
            await progress.wait_for(lambda: len(inserted) >= goal)

    async def walk_while_inserting() -> list[dict[str, Any]]:
        nonlocal pages
        items: list[dict[str, Any]] = []
        cursor = None
        try:
            while True:
                await inserts_after(len(inserted) + 3)
                params: dict[str, Any] = {"tag": tag, "sort": "price", "limit": 7}
                response = await committed_client.get(
                    LIST, params={**params, **({"cursor": cursor} if cursor else {})}
                )
                assert response.status_code == 200, response.text
                page = response.json()
                pages += 1
                items += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    return items
        finally:
            done.set()

    walked, _ = await asyncio.gather(walk_while_inserting(), insert_meanwhile())
    walked_ids = [item["id"] for item in walked]
    assert len(walked_ids) == len(set(walked_ids))  # nothing twice
    assert set(ids) <= set(walked_ids)  # everything that existed at the start
    assert pages >= 9
    assert len(inserted) >= 3 * pages


@pytest.mark.parametrize("category", [None, (7, "fruit", "Fruit")])
def test_a_listed_product_is_serialised_byte_for_byte_as_a_product(
    category: tuple[int, str, str] | None,
) -> None:
    """The list builds plain records instead of models: the same bytes go out."""
    from catalog.schemas import PRODUCT_PAGE_JSON, ProductPage
    from catalog.service import _product_out, _product_record

    now = datetime.now(UTC)
    category_id, slug, name = category or (None, None, None)
    row = {
        "id": uuid.uuid4(),
        "name": "Red Apple",
        "price": Decimal("19.99"),
        "tags": ["red", "sale"],
        "version": 3,
        "created_at": now,
        "updated_at": now,
        "category_id": category_id,
        "category_slug": slug,
        "category_name": name,
    }
    as_models = ProductPage(items=[_product_out(row)], next_cursor="next").model_dump_json()
    as_records = PRODUCT_PAGE_JSON.dump_json(
        {"items": [_product_record(row)], "next_cursor": "next"}
    )
    assert as_records.decode() == as_models
