"""The refresh token as an HttpOnly cookie, for browsers that ask for it."""

from __future__ import annotations

import httpx

from .factories import register

COOKIE = {"Refresh-Token-Delivery": "cookie"}


def refresh_cookie(response: httpx.Response) -> str:
    [header] = response.headers.get_list("set-cookie")
    return header


async def cookie_login(client: httpx.AsyncClient) -> httpx.Response:
    account = await register(client)
    response = await client.post(
        "/auth/token",
        data={"username": account.email, "password": account.password},
        headers=COOKIE,
    )
    assert response.status_code == 200, response.text
    return response


async def test_a_login_that_asks_gets_the_refresh_token_only_as_a_cookie(
    client: httpx.AsyncClient,
) -> None:
    response = await cookie_login(client)

    assert set(response.json()) == {"access_token", "token_type", "expires_in", "scope"}
    header = refresh_cookie(response)
    assert header.startswith("bazaar_refresh=")
    attributes = {part.strip().lower() for part in header.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/auth/refresh", "max-age=1209600"} <= attributes
    # plain HTTP here: a Secure cookie would never come back
    assert "secure" not in attributes


async def test_the_cookie_refreshes_and_rotates(client: httpx.AsyncClient) -> None:
    login = await cookie_login(client)
    first = client.cookies["bazaar_refresh"]

    refreshed = await client.post("/auth/refresh", headers=COOKIE)

    assert refreshed.status_code == 200, refreshed.text
    assert "refresh_token" not in refreshed.json()
    assert refreshed.json()["access_token"] != login.json()["access_token"]
    assert client.cookies["bazaar_refresh"] != first
    # the spent cookie value is a reuse: the whole session is revoked
    client.cookies.clear()
    replayed = await client.post(
        "/auth/refresh", headers={**COOKIE, "Cookie": f"bazaar_refresh={first}"}
    )
    assert replayed.status_code == 401


async def test_the_cookie_is_read_only_when_the_client_asks(client: httpx.AsyncClient) -> None:
    await cookie_login(client)

    response = await client.post("/auth/refresh")

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "No refresh token in the body or the cookie"


async def test_logout_clears_the_cookie_and_ends_its_session(client: httpx.AsyncClient) -> None:
    login = await cookie_login(client)
    cookie = client.cookies["bazaar_refresh"]
    access = login.json()["access_token"]

    logout = await client.post("/auth/logout", headers={"Authorization": f"Bearer {access}"})

    assert logout.status_code == 204
    header = refresh_cookie(logout)
    assert header.startswith(('bazaar_refresh="";', "bazaar_refresh=;"))
    assert "path=/auth/refresh" in header.lower()
    assert "bazaar_refresh" not in client.cookies
    refused = await client.post(
        "/auth/refresh", headers={**COOKIE, "Cookie": f"bazaar_refresh={cookie}"}
    )
    assert refused.status_code == 401


async def test_api_clients_keep_the_json_flow(client: httpx.AsyncClient) -> None:
    account = await register(client)
    login = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert "set-cookie" not in login.headers
    refreshed = await client.post(
        "/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
    )
    assert refreshed.status_code == 200
    assert refreshed.json()["refresh_token"]
    assert "set-cookie" not in refreshed.headers
