from __future__ import annotations

import base64
import uuid

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt
from redis.asyncio import Redis

from auth.deps import client_address
from kit.security import revoked_token_key
from kit.settings import DEFAULT_JWT_ISSUER

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from .factories import login, register, registered_and_logged_in, unique_email

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["type"]
    assert body["title"]
    assert body["detail"]
    return body


# --- register ------------------------------------------------------------------


async def test_register_returns_the_user_with_a_normalised_email(
    client: httpx.AsyncClient,
) -> None:
    local = f"Ada.{uuid.uuid4().hex[:8]}"
    response = await client.post(
        "/auth/register",
        json={
            "email": f"  {local}@Example.COM ",
            "password": "long enough",
            "display_name": " Ada ",
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == f"{local.lower()}@example.com"
    assert body["display_name"] == "Ada"
    assert body["roles"] == ["user"]
    assert body["is_active"] is True
    assert uuid.UUID(body["id"])
    assert "password" not in body
    assert "password_hash" not in body


async def test_register_refuses_an_email_taken_in_another_case(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        "/auth/register",
        json={"email": account.email.upper(), "password": "another one", "display_name": "X"},
    )
    body = assert_problem(response, 409)
    assert body["detail"] == "An account with this email already exists"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"password": "short"}, "password"),
        ({"password": "WHO@example.com"}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"display_name": "   "}, "display_name"),
        ({"display_name": "nul\x00byte"}, "display_name"),
        ({"email": "nul\x00@example.com"}, "email"),
    ],
)
async def test_register_names_the_invalid_field(
    client: httpx.AsyncClient, overrides: dict[str, str], field: str
) -> None:
    body = {"email": "who@example.com", "password": "long enough", "display_name": "Who"}
    response = await client.post("/auth/register", json={**body, **overrides})
    problem = assert_problem(response, 422)
    assert [error["loc"] for error in problem["errors"]] == [["body", field]]  # type: ignore[attr-defined]


# --- token ---------------------------------------------------------------------


async def test_login_returns_a_bearer_pair_with_the_design_claims(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    response = await client.post(
        "/auth/token", data={"username": account.email.upper(), "password": account.password}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert len(body["refresh_token"]) >= 40
    header = jwt.get_unverified_header(body["access_token"])
    claims = jwt.get_unverified_claims(body["access_token"])
    assert header["alg"] == "ES256"
    assert header["kid"]
    assert claims["sub"] == account.id
    assert claims["name"] == account.display_name
    assert claims["roles"] == ["user"]
    assert claims["iss"] == DEFAULT_JWT_ISSUER
    assert claims["aud"] == "bazaar"
    assert claims["typ"] == "access"
    assert claims["scope"] == body["scope"] == "openid profile email"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["jti"]


async def test_unknown_email_and_wrong_password_get_the_same_invalid_grant(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    wrong = await client.post(
        "/auth/token", data={"username": account.email, "password": "not the password"}
    )
    unknown = await client.post(
        "/auth/token", data={"username": unique_email(), "password": "not the password"}
    )
    wrong_body, unknown_body = assert_problem(wrong, 400), assert_problem(unknown, 400)
    assert wrong_body == {**unknown_body, "instance": wrong_body["instance"]}
    assert wrong_body["detail"] == "Incorrect email or password"
    assert wrong_body["error"] == "invalid_grant"
    assert wrong_body["error_description"] == "Incorrect email or password"


async def test_me_returns_the_caller(client: httpx.AsyncClient) -> None:
    account, tokens = await registered_and_logged_in(client)
    response = await client.get("/auth/users/me", headers=tokens.headers)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == account.id
    assert body["email"] == account.email
    assert body["display_name"] == account.display_name
    assert body["roles"] == ["user"]


async def test_me_without_a_token_is_401(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/auth/users/me"), 401)
    assert body["detail"] == "A bearer token is required"


async def test_jwks_publishes_the_signing_key(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    response = await client.get("/auth/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=60"
    keys = response.json()["keys"]
    kid = jwt.get_unverified_header(tokens.access)["kid"]
    (published,) = [key for key in keys if key["kid"] == kid]
    assert published["kty"] == "EC"
    assert published["crv"] == "P-256"
    assert published["alg"] == "ES256"
    assert published["use"] == "sig"
    assert "d" not in published


# --- refresh and logout ----------------------------------------------------------


async def test_refresh_rotates_the_pair(client: httpx.AsyncClient) -> None:
    account, tokens = await registered_and_logged_in(client)
    response = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert response.status_code == 200
    body = response.json()
    assert body["refresh_token"] != tokens.refresh
    assert body["access_token"] != tokens.access
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["sub"] == account.id
    assert claims["sid"] == jwt.get_unverified_claims(tokens.access)["sid"]
    me = await client.get(
        "/auth/users/me", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert me.status_code == 200
    assert me.json()["id"] == account.id


async def test_unknown_refresh_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/refresh", json={"refresh_token": "made-up"})
    body = assert_problem(response, 401)
    assert body["detail"] == "Refresh token is invalid or expired"


async def test_logout_revokes_the_access_token_and_its_refresh_family(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    _, tokens = await registered_and_logged_in(client)
    assert (await client.post("/auth/logout", headers=tokens.headers)).status_code == 204
    body = assert_problem(await client.get("/auth/users/me", headers=tokens.headers), 401)
    assert body["detail"] == "Token revoked"
    # blocklisted for the token's remaining life, no longer
    redis = Redis.from_url(redis_url)
    try:
        ttl = await redis.ttl(revoked_token_key(jwt.get_unverified_claims(tokens.access)["jti"]))
    finally:
        await redis.aclose()
    assert 0 < ttl <= 901
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert assert_problem(refreshed, 401)["detail"] == "Refresh token is invalid or expired"


async def test_logout_leaves_other_sessions_alone(client: httpx.AsyncClient) -> None:
    account, first = await registered_and_logged_in(client)
    second = await login(client, account.email, account.password)
    assert (await client.post("/auth/logout", headers=first.headers)).status_code == 204
    assert (await client.get("/auth/users/me", headers=second.headers)).status_code == 200
    refreshed = await client.post("/auth/refresh", json={"refresh_token": second.refresh})
    assert refreshed.status_code == 200


# --- throttling ------------------------------------------------------------------


async def test_failed_logins_for_one_account_are_throttled(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for _ in range(3):  # login_failures_per_account_and_client in the test settings
        wrong = await client.post(
            "/auth/token", data={"username": account.email, "password": "wrong password"}
        )
        assert_problem(wrong, 400)
    right = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    body = assert_problem(right, 429)
    assert 0 < int(right.headers["retry-after"]) <= 900
    assert body["retry_after"] == int(right.headers["retry-after"])
    # an OAuth library recognises it as an error, not a token
    assert body["error"] == "temporarily_unavailable"


async def test_an_unknown_account_is_throttled_like_a_real_one(
    client: httpx.AsyncClient,
) -> None:
    email = unique_email()
    for _ in range(3):
        assert_problem(
            await client.post("/auth/token", data={"username": email, "password": "guess 1234"}),
            400,
        )
    assert_problem(
        await client.post("/auth/token", data={"username": email, "password": "guess 1234"}), 429
    )


async def test_failed_logins_from_one_client_are_throttled(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    account = await register(client)
    # six different accounts from one address: no account reaches its own limit
    for _ in range(6):
        assert_problem(
            await client.post(
                "/auth/token", data={"username": unique_email(), "password": "guess 1234"}
            ),
            400,
        )
    blocked = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert_problem(blocked, 429)
    app.dependency_overrides[client_address] = lambda: "192.0.2.77"
    elsewhere = await client.post(
        "/auth/token", data={"username": account.email, "password": account.password}
    )
    assert elsewhere.status_code == 200


async def test_a_successful_login_resets_the_account_counter(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for _ in range(2):
        await client.post("/auth/token", data={"username": account.email, "password": "nope nope"})
    await login(client, account.email, account.password)
    for _ in range(2):
        await client.post("/auth/token", data={"username": account.email, "password": "nope nope"})
    await login(client, account.email, account.password)


# --- admin -----------------------------------------------------------------------


async def login_admin(client: httpx.AsyncClient) -> dict[str, str]:
    return (await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)).headers


async def test_bootstrap_admin_has_the_admin_role(client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/users/me", headers=await login_admin(client))
    assert response.status_code == 200
    assert response.json()["email"] == ADMIN_EMAIL
    assert "admin" in response.json()["roles"]


async def test_list_users_pages_without_gaps(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await register(client)
    headers = await login_admin(client)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get("/auth/users", params=params, headers=headers)
        assert response.status_code == 200
        page = response.json()
        assert len(page["items"]) <= 2
        seen.extend(item["email"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) >= 4


async def test_list_users_caps_the_limit(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/auth/users", params={"limit": "100000"}, headers=await login_admin(client)
    )
    assert response.status_code == 200
    assert len(response.json()["items"]) <= 100


async def test_list_users_needs_the_admin_role(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    body = assert_problem(await client.get("/auth/users", headers=tokens.headers), 403)
    assert body["detail"] == "The 'admin' role is required"


async def test_patch_changes_only_the_fields_sent(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.patch(
        f"/auth/users/{account.id}",
        json={"display_name": "Renamed"},
        headers=await login_admin(client),
    )
    assert response.status_code == 200
    body = response.json()
    assert body["display_name"] == "Renamed"
    assert body["roles"] == ["user"]
    assert body["is_active"] is True


async def test_patch_grants_admin_and_the_next_token_carries_it(
    client: httpx.AsyncClient,
) -> None:
    account, tokens = await registered_and_logged_in(client)
    response = await client.patch(
        f"/auth/users/{account.id}",
        json={"roles": ["user", "admin"]},
        headers=await login_admin(client),
    )
    assert response.status_code == 200
    assert response.json()["roles"] == ["admin", "user"]
    # granting takes nothing away, so the old token still works...
    assert (await client.get("/auth/users/me", headers=tokens.headers)).status_code == 200
    # ...and a refreshed one can use admin routes
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    access = refreshed.json()["access_token"]
    listing = await client.get("/auth/users", headers={"Authorization": f"Bearer {access}"})
    assert listing.status_code == 200


async def test_taking_a_role_away_revokes_existing_tokens(client: httpx.AsyncClient) -> None:
    account = await register(client)
    headers = await login_admin(client)
    await client.patch(
        f"/auth/users/{account.id}", json={"roles": ["admin", "user"]}, headers=headers
    )
    promoted = await login(client, account.email, account.password)
    assert (await client.get("/auth/users", headers=promoted.headers)).status_code == 200
    await client.patch(f"/auth/users/{account.id}", json={"roles": ["user"]}, headers=headers)
    assert_problem(await client.get("/auth/users", headers=promoted.headers), 401)
    # the session survives: a refresh right away carries the reduced roles
    refreshed = await client.post("/auth/refresh", json={"refresh_token": promoted.refresh})
    assert refreshed.status_code == 200
    assert jwt.get_unverified_claims(refreshed.json()["access_token"])["roles"] == ["user"]
    # a fresh login right away carries the reduced roles and works
    again = await login(client, account.email, account.password)
    me = await client.get("/auth/users/me", headers=again.headers)
    assert me.status_code == 200
    assert me.json()["roles"] == ["user"]


@pytest.mark.parametrize(
    "body",
    [{"roles": None}, {"roles": ["superuser"]}, {"roles": []}, {"is_active": None}, {"x": 1}],
)
async def test_patch_rejects_invalid_changes(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    account = await register(client)
    response = await client.patch(
        f"/auth/users/{account.id}", json=body, headers=await login_admin(client)
    )
    assert_problem(response, 422)


async def test_patch_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    response = await client.patch(
        f"/auth/users/{uuid.uuid4()}",
        json={"is_active": False},
        headers=await login_admin(client),
    )
    assert assert_problem(response, 404)["detail"] == "No such user"


async def test_an_admin_cannot_lock_themselves_out(client: httpx.AsyncClient) -> None:
    headers = await login_admin(client)
    me = (await client.get("/auth/users/me", headers=headers)).json()
    for change in ({"is_active": False}, {"roles": ["user"]}):
        response = await client.patch(f"/auth/users/{me['id']}", json=change, headers=headers)
        assert_problem(response, 403)


async def test_metrics_are_open_without_credentials_configured(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert "http_requests_total" in response.text


async def test_openapi_lists_every_auth_operation(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {
        "/auth/register": {"post"},
        "/auth/token": {"post"},
        "/auth/refresh": {"post"},
        "/auth/logout": {"post"},
        "/auth/users/me": {"get"},
        "/auth/users": {"get"},
        "/auth/users/{user_id}": {"patch"},
        "/auth/.well-known/jwks.json": {"get"},
    }.items() <= {path: set(operations) for path, operations in paths.items()}.items()


async def test_hostile_strings_never_reach_the_database_as_errors(
    client: httpx.AsyncClient,
) -> None:
    login = await client.post(
        "/auth/token", data={"username": "who\x00@example.com", "password": "whatever"}
    )
    assert_problem(login, 422)
    assert login.json()["errors"][0]["loc"] == ["body", "username"]
    refresh = await client.post("/auth/refresh", json={"refresh_token": "\x00\x01"})
    assert_problem(refresh, 422)
    assert refresh.json()["errors"][0]["loc"] == ["body", "refresh_token"]
    surrogate = await client.post(
        "/auth/register",
        content=b'{"email": "a@example.com", "password": "long enough", "display_name": "\\udfff"}',
        headers={"content-type": "application/json"},
    )
    assert_problem(surrogate, 422)
    assert surrogate.json()["errors"][0]["loc"] == ["body", "display_name"]
    admin = await login_admin(client)
    cursor = base64.urlsafe_b64encode(b"a\x00b").decode()
    page = await client.get("/auth/users", params={"cursor": cursor}, headers=admin)
    assert page.status_code == 200
    assert isinstance(page.json()["items"], list)
