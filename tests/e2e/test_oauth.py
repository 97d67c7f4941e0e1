"""Standard clients against the stack, through the gateway only: Authlib (an
OAuth 2.0 client library) logs in, refreshes, gets a wrong password reported
as an error, revokes, runs a machine client and introspects; PyJWT's JWKS
client verifies tokens from nothing but the discovery document; the merged
OpenAPI document and Swagger UI's "Authorize" requests still work."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from .conftest import IMPORTER, RESOURCE_SERVER, Stack
from .helpers import bearer, register
from .oauth_client import AsyncOAuth2Client, OAuthError

DISCOVERY = "/.well-known/openid-configuration"


@pytest.fixture
async def metadata(stack: Stack) -> dict[str, Any]:
    """What a client knows after discovery, from the issuer's URL alone."""
    async with httpx.AsyncClient(timeout=20) as http:
        response = await http.get(f"{stack.base_url}/auth{DISCOVERY}")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture
async def app_client(metadata: dict[str, Any]) -> AsyncIterator[AsyncOAuth2Client]:
    """A public client, as an app people log in with would be configured."""
    async with AsyncOAuth2Client(
        client_id="e2e-app", token_endpoint=metadata["token_endpoint"], timeout=20
    ) as client:
        yield client


def product_row() -> dict[str, Any]:
    name = "Imported " + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:10])
    return {"name": name, "price": "3.50", "tags": ["import"]}


async def verify_with_pyjwt(token: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Verification as any resource server would set it up from discovery."""
    keys = jwt.PyJWKClient(metadata["jwks_uri"])
    key = await asyncio.to_thread(keys.get_signing_key_from_jwt, token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=metadata["access_token_signing_alg_values_supported"],
        issuer=metadata["issuer"],
        audience="bazaar",
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    return claims


async def test_discovery_tells_a_client_where_everything_is(
    stack: Stack, client: httpx.AsyncClient, metadata: dict[str, Any]
) -> None:
    issuer = f"{stack.base_url}/auth"
    assert metadata["issuer"] == issuer  # fetched from <issuer>/.well-known/...
    for name in (
        "token_endpoint",
        "jwks_uri",
        "revocation_endpoint",
        "introspection_endpoint",
        "userinfo_endpoint",
    ):
        assert metadata[name].startswith(f"{issuer}/"), (name, metadata[name])
    assert set(metadata["grant_types_supported"]) == {
        "password",
        "refresh_token",
        "client_credentials",
    }
    assert {"openid", "profile", "email", "catalog:import"} <= set(metadata["scopes_supported"])
    jwks = await client.get(metadata["jwks_uri"])
    assert jwks.status_code == 200
    assert {key["alg"] for key in jwks.json()["keys"]} <= set(
        metadata["access_token_signing_alg_values_supported"]
    )

    response = await client.get(f"/auth{DISCOVERY}")
    assert response.headers["cache-control"] == "public, max-age=300"
    cached = await client.get(
        f"/auth{DISCOVERY}", headers={"If-None-Match": response.headers["etag"]}
    )
    assert cached.status_code == 304
    # RFC 8414's own location: the well-known segment before the issuer's path
    rfc8414 = await client.get(
        "/.well-known/oauth-authorization-server/auth", follow_redirects=True
    )
    assert rfc8414.status_code == 200
    assert rfc8414.json() == metadata


async def test_a_standard_client_logs_in_refreshes_and_revokes(
    client: httpx.AsyncClient, app_client: AsyncOAuth2Client, metadata: dict[str, Any]
) -> None:
    user = await register(client)
    token = await app_client.fetch_token(
        metadata["token_endpoint"],
        grant_type="password",
        username=user["email"],
        password=user["password"],
        scope="openid profile email",
    )
    assert token["token_type"].lower() == "bearer"
    claims = await verify_with_pyjwt(token["access_token"], metadata)
    assert claims["sub"] == user["id"]
    assert claims["iss"] == metadata["issuer"]

    me = await app_client.get(metadata["userinfo_endpoint"])
    assert me.status_code == 200
    assert me.json()["email"] == user["email"]
    assert me.json()["sub"] == user["id"]

    first_refresh = token["refresh_token"]
    refreshed = await app_client.refresh_token(metadata["token_endpoint"])
    assert refreshed["refresh_token"] != first_refresh
    assert refreshed["access_token"] != token["access_token"]
    await verify_with_pyjwt(refreshed["access_token"], metadata)

    # the spent refresh token is recognised as an error, never taken for a token
    with pytest.raises(OAuthError) as reused:
        await app_client.refresh_token(metadata["token_endpoint"], refresh_token=first_refresh)
    assert reused.value.error == "invalid_grant"


async def test_a_wrong_password_is_an_error_to_the_client(
    client: httpx.AsyncClient, app_client: AsyncOAuth2Client, metadata: dict[str, Any]
) -> None:
    user = await register(client)
    with pytest.raises(OAuthError) as wrong:
        await app_client.fetch_token(
            metadata["token_endpoint"],
            grant_type="password",
            username=user["email"],
            password="not the password",
        )
    assert wrong.value.error == "invalid_grant"
    assert wrong.value.description == "Incorrect email or password"
    assert app_client.token is None


async def test_a_throttled_login_is_an_error_to_the_client_with_retry_after(
    client: httpx.AsyncClient, app_client: AsyncOAuth2Client, metadata: dict[str, Any]
) -> None:
    user = await register(client)
    for _ in range(5):  # LOGIN_FAILURES_PER_ACCOUNT's default
        with pytest.raises(OAuthError):
            await app_client.fetch_token(
                metadata["token_endpoint"], username=user["email"], password="guess 12345"
            )
    with pytest.raises(OAuthError) as throttled:
        await app_client.fetch_token(
            metadata["token_endpoint"], username=user["email"], password=user["password"]
        )
    assert throttled.value.error == "temporarily_unavailable"
    raw = await client.post(
        "/auth/token",
        data={"grant_type": "password", "username": user["email"], "password": user["password"]},
    )
    assert raw.status_code == 429
    assert 0 < int(raw.headers["retry-after"]) <= 900


async def test_revocation_ends_the_session_everywhere(
    client: httpx.AsyncClient, app_client: AsyncOAuth2Client, metadata: dict[str, Any]
) -> None:
    user = await register(client)
    token = await app_client.fetch_token(
        metadata["token_endpoint"], username=user["email"], password=user["password"]
    )
    revoked = await app_client.revoke_token(
        metadata["revocation_endpoint"],
        token=token["refresh_token"],
        token_type_hint="refresh_token",
    )
    assert revoked.status_code == 200
    with pytest.raises(OAuthError) as refused:
        await app_client.refresh_token(metadata["token_endpoint"])
    assert refused.value.error == "invalid_grant"
    # the access token issued with it is refused at the edge and by every service
    me = await client.get("/auth/users/me", headers=bearer(token["access_token"]))
    assert me.status_code == 401
    products = await client.post(
        "/catalog/products", json=product_row(), headers=bearer(token["access_token"])
    )
    assert products.status_code == 401


async def test_a_machine_client_imports_products_with_its_own_token(
    stack: Stack, client: httpx.AsyncClient, metadata: dict[str, Any]
) -> None:
    async with AsyncOAuth2Client(
        client_id=IMPORTER[0], client_secret=IMPORTER[1], timeout=20
    ) as importer:
        token = await importer.fetch_token(
            metadata["token_endpoint"], grant_type="client_credentials", scope="catalog:import"
        )
        assert "refresh_token" not in token
        assert token["scope"] == "catalog:import"
        claims = await verify_with_pyjwt(token["access_token"], metadata)
        assert claims["client_id"] == claims["sub"] == IMPORTER[0]

        rows = [product_row() for _ in range(3)]
        imported = await importer.post(f"{stack.base_url}/catalog/products:import", json=rows)
        assert imported.status_code == 201, imported.text
        assert imported.json()["count"] == 3
        listed = await client.get("/catalog/products", params={"q": rows[0]["name"]})
        assert [item["name"] for item in listed.json()["items"]] == [rows[0]["name"].title()]

        # a user's token, even an admin's, is not an import credential
        user = await register(client)
        login = await client.post(
            "/auth/token", data={"username": user["email"], "password": user["password"]}
        )
        as_user = await client.post(
            "/catalog/products:import",
            json=[product_row()],
            headers=bearer(login.json()["access_token"]),
        )
        assert as_user.status_code == 403
        assert as_user.json()["error"] == "insufficient_scope"

        revoked = await importer.revoke_token(
            metadata["revocation_endpoint"], token=token["access_token"]
        )
        assert revoked.status_code == 200
        after = await client.post(
            "/catalog/products:import",
            json=[product_row()],
            headers=bearer(token["access_token"]),
        )
        assert after.status_code == 401

    async with AsyncOAuth2Client(
        client_id=IMPORTER[0], client_secret="not-the-secret-0123456789", timeout=20
    ) as impostor:
        with pytest.raises(OAuthError) as refused:
            await impostor.fetch_token(metadata["token_endpoint"], grant_type="client_credentials")
    assert refused.value.error == "invalid_client"


async def test_a_resource_server_introspects_tokens(
    client: httpx.AsyncClient, app_client: AsyncOAuth2Client, metadata: dict[str, Any]
) -> None:
    user = await register(client)
    token = await app_client.fetch_token(
        metadata["token_endpoint"], username=user["email"], password=user["password"]
    )
    async with AsyncOAuth2Client(
        client_id=RESOURCE_SERVER[0], client_secret=RESOURCE_SERVER[1], timeout=20
    ) as reports:
        active = await reports.introspect_token(
            metadata["introspection_endpoint"], token=token["access_token"]
        )
        assert active.status_code == 200
        body = active.json()
        assert body["active"] is True
        assert (body["sub"], body["roles"], body["iss"]) == (
            user["id"],
            ["user"],
            metadata["issuer"],
        )
        assert (
            await app_client.revoke_token(
                metadata["revocation_endpoint"], token=token["access_token"]
            )
        ).status_code == 200
        inactive = await reports.introspect_token(
            metadata["introspection_endpoint"], token=token["access_token"]
        )
        assert inactive.json() == {"active": False}

    anonymous = await client.post("/auth/introspect", data={"token": token["access_token"]})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "invalid_client"


async def test_the_merged_openapi_documents_oauth_and_swagger_authorize_works(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for path, method in (
        ("/auth/token", "post"),
        ("/auth/revoke", "post"),
        ("/auth/introspect", "post"),
        ("/auth/userinfo", "get"),
        ("/auth/.well-known/openid-configuration", "get"),
        ("/auth/.well-known/oauth-authorization-server", "get"),
        ("/catalog/products:import", "post"),
    ):
        assert method in paths.get(path, {}), path
    schemes = document["components"]["securitySchemes"]
    password_flow = schemes["OAuth2PasswordBearer"]["flows"]["password"]
    client_flow = schemes["ImportClient"]["flows"]["clientCredentials"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    # the page starts Swagger UI from a served script, on the merged document
    assert '<script src="/assets/js/docs.js"' in docs.text
    starter = await client.get("/assets/js/docs.js")
    assert starter.status_code == 200
    assert 'url: "/openapi.json"' in starter.text

    # Swagger UI's "Authorize", password flow: the form with an empty scope,
    # client credentials in the body (none typed) or as an empty Basic header
    user = await register(client)
    form = {
        "grant_type": "password",
        "scope": "",
        "username": user["email"],
        "password": user["password"],
    }
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b":").decode()}):
        response = await client.post(password_flow["tokenUrl"], data=form, headers=headers)
        assert response.status_code == 200, response.text
        me = await client.get("/auth/users/me", headers=bearer(response.json()["access_token"]))
        assert me.status_code == 200

    # ... and the client-credentials flow: Basic client id and secret, the scopes ticked
    pair = f"{IMPORTER[0]}:{IMPORTER[1]}".encode()
    response = await client.post(
        client_flow["tokenUrl"],
        data={"grant_type": "client_credentials", "scope": " ".join(client_flow["scopes"])},
        headers={"Authorization": "Basic " + base64.b64encode(pair).decode()},
    )
    assert response.status_code == 200, response.text
    imported = await client.post(
        "/catalog/products:import",
        json=[product_row()],
        headers=bearer(response.json()["access_token"]),
    )
    assert imported.status_code == 201, imported.text
