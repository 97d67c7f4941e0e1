"""ETags, conditional PATCH and DELETE."""

from __future__ import annotations

import uuid

import httpx

from .factories import create_category, create_product, unique_name
from .test_router import assert_problem, error_locs


async def test_if_none_match_with_the_current_etag_is_304(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    for header in ('"1"', 'W/"1"', '"7", "1"', "*"):
        response = await client.get(url, headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.content == b""
        assert response.headers["etag"] == '"1"'


async def test_if_none_match_with_another_etag_is_200(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.get(
        f"/catalog/products/{created['id']}", headers={"If-None-Match": '"2"'}
    )
    assert response.status_code == 200
    assert response.json() == created


async def test_patch_applies_only_the_fields_sent(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_category(client, admin_headers, "fruit")
    created = await create_product(
        client, admin_headers, price="5.00", tags=["fresh"], category="fruit"
    )
    response = await client.patch(
        f"/catalog/products/{created['id']}",
        json={"price": "6.5"},
        headers={**admin_headers, "If-Match": '"1"'},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["etag"] == '"2"'
    assert body["version"] == 2
    assert (body["price"], body["price_with_tax"]) == ("6.50", "7.15")
    assert (body["name"], body["tags"], body["category"]) == (
        created["name"],
        ["fresh"],
        created["category"],
    )
    assert body["updated_at"] >= created["updated_at"]
    fetched = await client.get(f"/catalog/products/{created['id']}")
    assert fetched.json() == body


async def test_patch_can_rename_and_remove_the_category(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await create_category(client, admin_headers, "fruit")
    created = await create_product(client, admin_headers, category="fruit")
    new_name = unique_name("renamed")
    response = await client.patch(
        f"/catalog/products/{created['id']}",
        json={"name": new_name, "category": None},
        headers={**admin_headers, "If-Match": '"1"'},
    )
    assert response.status_code == 200, response.text
    assert (response.json()["name"], response.json()["category"]) == (new_name.title(), None)


async def test_patch_without_if_match_is_428(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.patch(
        f"/catalog/products/{created['id']}", json={"price": "2"}, headers=admin_headers
    )
    body = assert_problem(response, 428)
    assert body["detail"] == "Send If-Match with the product's current ETag"


async def test_patch_with_a_stale_etag_is_412_and_changes_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    first = await client.patch(
        url, json={"price": "2"}, headers={**admin_headers, "If-Match": '"1"'}
    )
    assert first.status_code == 200
    # the last two: numbers no version reaches (int() refuses 4,301 digits)
    for stale in ('"1"', 'W/"2"', "garbage", '"2147483648"', '"' + "9" * 5000 + '"'):
        second = await client.patch(
            url, json={"price": "3"}, headers={**admin_headers, "If-Match": stale}
        )
        assert_problem(second, 412)
    assert (await client.get(url)).json()["price"] == "2.00"


async def test_patch_with_if_match_star_applies(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.patch(
        f"/catalog/products/{created['id']}",
        json={"tags": ["new"]},
        headers={**admin_headers, "If-Match": "*"},
    )
    assert response.status_code == 200
    assert response.json()["tags"] == ["new"]


async def test_patch_revalidates_the_whole_product(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers, tags=["sale"], price="50")
    response = await client.patch(
        f"/catalog/products/{created['id']}",
        json={"price": "150"},
        headers={**admin_headers, "If-Match": '"1"'},
    )
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["body", "price"]
    assert body["errors"][0]["type"] == "sale_price_too_high"


async def test_patch_field_rules_and_nulls_are_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    headers = {**admin_headers, "If-Match": '"1"'}
    cases = [
        ({"name": "b2"}, ["body", "name"]),
        ({"price": "0.001"}, ["body", "price"]),
        ({"name": None}, ["body", "name"]),
        ({"tags": None}, ["body", "tags"]),
        ({"size": 1}, ["body", "size"]),
    ]
    for payload, loc in cases:
        response = await client.patch(url, json=payload, headers=headers)
        assert error_locs(assert_problem(response, 422)) == [loc], payload


async def test_patch_into_a_taken_name_is_409(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    taken = await create_product(client, admin_headers)
    created = await create_product(client, admin_headers)
    response = await client.patch(
        f"/catalog/products/{created['id']}",
        json={"name": taken["name"]},
        headers={**admin_headers, "If-Match": '"1"'},
    )
    assert_problem(response, 409)


async def test_patch_unknown_id_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.patch(
        f"/catalog/products/{uuid.uuid4()}",
        json={"price": "1"},
        headers={**admin_headers, "If-Match": '"1"'},
    )
    assert_problem(response, 404)


async def test_empty_patch_changes_nothing(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    response = await client.patch(
        f"/catalog/products/{created['id']}", json={}, headers={**admin_headers, "If-Match": '"1"'}
    )
    assert response.status_code == 200
    assert response.json() == created


async def test_patch_and_delete_need_admin(
    client: httpx.AsyncClient, admin_headers: dict[str, str], user_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    assert_problem(await client.patch(url, json={"price": "1"}, headers={"If-Match": '"1"'}), 401)
    assert_problem(
        await client.patch(url, json={"price": "1"}, headers={**user_headers, "If-Match": '"1"'}),
        403,
    )
    assert_problem(await client.delete(url), 401)
    assert_problem(await client.delete(url, headers=user_headers), 403)
    assert (await client.get(url)).json() == created


async def test_delete_is_204_then_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    response = await client.delete(url, headers=admin_headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(url), 404)
    assert_problem(await client.delete(url, headers=admin_headers), 404)


async def test_delete_with_a_stale_if_match_is_412(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    created = await create_product(client, admin_headers)
    url = f"/catalog/products/{created['id']}"
    for stale in ('"9"', '"2147483648"', '"' + "9" * 5000 + '"', '"9", "99999999999"'):
        response = await client.delete(url, headers={**admin_headers, "If-Match": stale})
        assert_problem(response, 412)
    response = await client.delete(url, headers={**admin_headers, "If-Match": '"1"'})
    assert response.status_code == 204


async def test_a_patch_changes_only_the_fields_it_sends(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The stored fields are not normalised again: title-casing a title-cased
    name is not always the same name ("İ" lower-cases to "i" and a combining
    dot, after which "y" starts a new word)."""
    created = await create_product(
        client, admin_headers, name="DİYARBAKIR " + unique_name("Kebab").upper(), tags=["grill"]
    )
    url = f"/catalog/products/{created['id']}"
    response = await client.patch(
        url, json={"price": "13"}, headers={**admin_headers, "If-Match": '"1"'}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["tags"], body["price"]) == (created["name"], ["grill"], "13.00")
    assert (await client.get(url)).json()["name"] == created["name"]


async def test_a_tag_is_measured_as_it_is_stored(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """Lower-cased, "İ" is two characters: 32 of them make a tag of 64."""
    response = await client.post(
        "/catalog/products",
        json={"name": unique_name(), "price": "1", "tags": ["İ" * 32]},
        headers=admin_headers,
    )
    assert error_locs(assert_problem(response, 422)) == [["body", "tags", 0]]
    created = await create_product(client, admin_headers, tags=["İ" * 16])
    assert created["tags"] == ["i̇" * 16]
