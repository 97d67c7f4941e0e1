"""The OAuth 2.0 surface: the token endpoint's grants and errors (RFC 6749),
client authentication, revocation (RFC 7009), introspection (RFC 7662),
userinfo and discovery (RFC 8414, OpenID Connect)."""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from jose import jwt
from pydantic import ValidationError

from auth.config import Settings
from auth.discovery import server_metadata, warn_if_issuer_is_elsewhere
from kit_testing import MailCatcher, emailed_token

from .conftest import IMPORTER, RESOURCE_SERVER, make_settings
from .factories import login, register, registered_and_logged_in
from .test_router import assert_problem

TOKEN = "/auth/token"


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> dict[str, object]:
    """A problem+json body that is also an RFC 6749 error response."""
    body = assert_problem(response, status)
    assert body["error"] == error, body
    assert body["error_description"] == body["detail"]
    return body


def basic(client_id: str, secret: str) -> dict[str, str]:
    """HTTP Basic as RFC 6749 section 2.3.1 writes it: both parts form-encoded."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


async def password_grant(client: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    response = await client.post(
        TOKEN, data={"grant_type": "password", "username": email, "password": password}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def machine_token(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    return await client.post(
        TOKEN, data={"grant_type": "client_credentials", **form}, auth=IMPORTER
    )


async def introspect(client: httpx.AsyncClient, token: str, **form: str) -> dict[str, Any]:
    response = await client.post(
        "/auth/introspect", data={"token": token, **form}, auth=RESOURCE_SERVER
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


# --- token endpoint: password and refresh_token ------------------------------------


async def test_password_grant_answers_a_token_response_nobody_caches(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    response = await client.post(
        TOKEN,
        data={"grant_type": "password", "username": account.email, "password": account.password},
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in", "scope"}
    assert (body["token_type"], body["expires_in"]) == ("bearer", 900)
    assert body["scope"] == "openid profile email"


async def test_a_user_may_ask_for_fewer_scopes_and_is_told_what_was_granted(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    response = await client.post(
        TOKEN,
        data={
            "grant_type": "password",
            "username": account.email,
            "password": account.password,
            "scope": "openid",
        },
    )
    assert response.status_code == 200
    assert response.json()["scope"] == "openid profile email"


async def test_a_scope_no_user_can_have_is_invalid_scope(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        TOKEN,
        data={
            "grant_type": "password",
            "username": account.email,
            "password": account.password,
            "scope": "openid catalog:import",
        },
    )
    body = assert_oauth_error(response, 400, "invalid_scope")
    assert "catalog:import" in str(body["detail"])


@pytest.mark.parametrize(
    ("form", "error", "detail"),
    [
        ({}, "invalid_request", "grant_type is required"),
        ({"grant_type": "authorization_code", "code": "x"}, "unsupported_grant_type", None),
        ({"grant_type": "password", "password": "x"}, "invalid_request", "username is required"),
        ({"grant_type": "password", "username": "a@example.com"}, "invalid_request", None),
        ({"grant_type": "refresh_token"}, "invalid_request", "refresh_token is required"),
        (
            {"grant_type": "password", "username": "a@example.com", "password": "x" * 1025},
            "invalid_request",
            None,
        ),
    ],
)
async def test_malformed_token_requests_get_the_rfc_error(
    client: httpx.AsyncClient, form: dict[str, str], error: str, detail: str | None
) -> None:
    body = assert_oauth_error(await client.post(TOKEN, data=form), 400, error)
    if detail is not None:
        assert body["detail"] == detail


async def test_a_json_body_or_a_repeated_parameter_is_invalid_request(
    client: httpx.AsyncClient,
) -> None:
    as_json = await client.post(TOKEN, json={"grant_type": "password", "username": "a"})
    body = assert_oauth_error(as_json, 400, "invalid_request")
    assert "x-www-form-urlencoded" in str(body["detail"])
    repeated = await client.post(
        TOKEN,
        content="grant_type=password&username=a%40b.c&password=x&password=y",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    body = assert_oauth_error(repeated, 400, "invalid_request")
    assert body["detail"] == "password was sent more than once"


async def test_refresh_token_grant_rotates_and_a_reuse_ends_the_session(
    client: httpx.AsyncClient,
) -> None:
    account, tokens = await registered_and_logged_in(client)
    response = await client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": tokens.refresh}
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    rotated = response.json()
    assert rotated["refresh_token"] != tokens.refresh
    assert rotated["scope"] == "openid profile email"
    claims = jwt.get_unverified_claims(rotated["access_token"])
    assert claims["sub"] == account.id
    assert claims["sid"] == jwt.get_unverified_claims(tokens.access)["sid"]

    reused = await client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": tokens.refresh}
    )
    body = assert_oauth_error(reused, 400, "invalid_grant")
    assert body["detail"] == "Refresh token was already used; the session is revoked"
    # reuse revoked the family: the token that replaced it is spent too
    after = await client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"]}
    )
    assert_oauth_error(after, 400, "invalid_grant")
    me = await client.get(
        "/auth/users/me", headers={"Authorization": f"Bearer {rotated['access_token']}"}
    )
    assert_problem(me, 401)


async def test_the_json_refresh_endpoint_keeps_its_401_and_gains_the_error_member(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/auth/refresh", json={"refresh_token": "made-up"})
    body = assert_oauth_error(response, 401, "invalid_grant")
    assert body["detail"] == "Refresh token is invalid or expired"
    _, tokens = await registered_and_logged_in(client)
    ok = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "no-store"
    assert ok.json()["scope"] == "openid profile email"


async def test_swagger_uis_password_requests_work(client: httpx.AsyncClient) -> None:
    """What Swagger UI's "Authorize" sends: an empty scope, and with the client
    credentials location set to the header and no client id typed in, `Basic :`."""
    account = await register(client)
    form = {
        "grant_type": "password",
        "scope": "",
        "username": account.email,
        "password": account.password,
    }
    in_body = await client.post(TOKEN, data=form)
    in_header = await client.post(TOKEN, data=form, headers={"Authorization": "Basic Og=="})
    assert in_body.status_code == in_header.status_code == 200, in_header.text


# --- client credentials -------------------------------------------------------------


async def test_client_credentials_issue_a_scoped_token_without_refresh(
    client: httpx.AsyncClient,
) -> None:
    response = await machine_token(client)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert "refresh_token" not in body
    assert body["scope"] == "catalog:import catalog:read"
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["sub"] == claims["client_id"] == IMPORTER[0]
    assert claims["roles"] == []
    assert claims["scope"] == "catalog:import catalog:read"
    assert claims["typ"] == "access"
    assert "sid" not in claims


async def test_client_credentials_narrow_to_the_scopes_asked_for(
    client: httpx.AsyncClient,
) -> None:
    narrowed = await machine_token(client, scope="catalog:import")
    assert narrowed.json()["scope"] == "catalog:import"
    refused = await machine_token(client, scope="catalog:import catalog:write")
    body = assert_oauth_error(refused, 400, "invalid_scope")
    assert "catalog:write" in str(body["detail"])


async def test_client_secret_post_and_encoded_basic_authenticate_too(
    client: httpx.AsyncClient,
) -> None:
    posted = await client.post(
        TOKEN,
        data={
            "grant_type": "client_credentials",
            "client_id": IMPORTER[0],
            "client_secret": IMPORTER[1],
        },
    )
    assert posted.status_code == 200, posted.text
    # the resource server's secret has characters form-encoding changes
    encoded = await client.post(
        "/auth/introspect", data={"token": "x"}, headers=basic(*RESOURCE_SERVER)
    )
    assert encoded.status_code == 200, encoded.text


@pytest.mark.parametrize(
    ("auth", "form"),
    [
        (None, {}),
        ((IMPORTER[0], "wrong-secret-0123456789"), {}),
        (("nobody", IMPORTER[1]), {}),
        (None, {"client_id": IMPORTER[0]}),
        (None, {"client_id": IMPORTER[0], "client_secret": "wrong"}),
        (None, {"client_secret": IMPORTER[1]}),
    ],
)
async def test_wrong_or_missing_client_credentials_are_invalid_client(
    client: httpx.AsyncClient, auth: tuple[str, str] | None, form: dict[str, str]
) -> None:
    headers = {} if auth is None else basic(*auth)
    response = await client.post(
        TOKEN, data={"grant_type": "client_credentials", **form}, headers=headers
    )
    assert_oauth_error(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic realm=")


@pytest.mark.parametrize("path", [TOKEN, "/auth/revoke", "/auth/introspect"])
@pytest.mark.parametrize(
    "credentials",
    [b"Basic \xe9\xe9\xe9\xe9", b"Basic Y2F0YWxvZy1pbXBvcnRlcg\xff=", b"Basic %%%"],
    ids=["latin-1", "latin-1-inside", "not-base64"],
)
async def test_basic_credentials_that_are_not_base64_are_invalid_client(
    client: httpx.AsyncClient, path: str, credentials: bytes
) -> None:
    form = {"grant_type": "client_credentials", "token": "made-up"}
    response = await client.post(path, data=form, headers={b"Authorization": credentials})
    assert_oauth_error(response, 401, "invalid_client")


async def test_one_client_authentication_method_at_a_time(client: httpx.AsyncClient) -> None:
    response = await client.post(
        TOKEN,
        data={"grant_type": "client_credentials", "client_secret": IMPORTER[1]},
        auth=IMPORTER,
    )
    assert_oauth_error(response, 400, "invalid_request")


async def test_a_confidential_client_cannot_log_users_in(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        TOKEN,
        data={"grant_type": "password", "username": account.email, "password": account.password},
        auth=IMPORTER,
    )
    assert_oauth_error(response, 400, "unauthorized_client")


async def test_a_public_client_may_name_itself(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        TOKEN,
        data={
            "grant_type": "password",
            "username": account.email,
            "password": account.password,
            "client_id": "bazaar-web",
        },
    )
    assert response.status_code == 200, response.text


# --- revocation (RFC 7009) --------------------------------------------------------------


async def test_revoking_a_refresh_token_ends_its_session(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    response = await client.post(
        "/auth/revoke", data={"token": tokens.refresh, "token_type_hint": "refresh_token"}
    )
    assert response.status_code == 200
    assert response.content == b""
    refreshed = await client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": tokens.refresh}
    )
    assert_oauth_error(refreshed, 400, "invalid_grant")
    body = assert_problem(await client.get("/auth/users/me", headers=tokens.headers), 401)
    assert body["detail"] == "Token revoked"


async def test_revoking_an_access_token_leaves_the_session(client: httpx.AsyncClient) -> None:
    _, tokens = await registered_and_logged_in(client)
    # a wrong hint only costs a lookup
    response = await client.post(
        "/auth/revoke", data={"token": tokens.access, "token_type_hint": "refresh_token"}
    )
    assert response.status_code == 200
    body = assert_problem(await client.get("/auth/users/me", headers=tokens.headers), 401)
    assert body["detail"] == "Token revoked"
    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert refreshed.status_code == 200


async def test_revoking_an_unknown_token_is_200_and_no_token_is_invalid_request(
    client: httpx.AsyncClient,
) -> None:
    for token in ("made-up", "a.b.c", "x" * 300):
        response = await client.post("/auth/revoke", data={"token": token})
        assert response.status_code == 200, response.text
    assert_oauth_error(await client.post("/auth/revoke", data={}), 400, "invalid_request")


async def test_only_its_client_revokes_a_machine_token(client: httpx.AsyncClient) -> None:
    access = (await machine_token(client)).json()["access_token"]
    anonymous = await client.post("/auth/revoke", data={"token": access})
    assert_oauth_error(anonymous, 401, "invalid_client")
    other = await client.post("/auth/revoke", data={"token": access}, auth=RESOURCE_SERVER)
    assert_oauth_error(other, 400, "unauthorized_client")
    assert (await introspect(client, access))["active"] is True

    owner = await client.post("/auth/revoke", data={"token": access}, auth=IMPORTER)
    assert owner.status_code == 200
    assert await introspect(client, access) == {"active": False}


# --- introspection (RFC 7662) -------------------------------------------------------------


async def test_introspection_describes_an_active_access_token(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    account, tokens = await registered_and_logged_in(client)
    body = await introspect(client, tokens.access, token_type_hint="access_token")
    claims = jwt.get_unverified_claims(tokens.access)
    assert body == {
        "active": True,
        "scope": "openid profile email",
        "token_type": "Bearer",
        "exp": claims["exp"],
        "iat": claims["iat"],
        "sub": account.id,
        "aud": "bazaar",
        "iss": settings.jwt_issuer,
        "jti": claims["jti"],
        "name": account.display_name,
        "roles": ["user"],
        "sid": claims["sid"],
    }
    assert (await client.post("/auth/logout", headers=tokens.headers)).status_code == 204
    assert await introspect(client, tokens.access) == {"active": False}


async def test_introspection_of_a_machine_token_names_its_client(
    client: httpx.AsyncClient,
) -> None:
    access = (await machine_token(client, scope="catalog:import")).json()["access_token"]
    body = await introspect(client, access)
    assert body["active"] is True
    assert (body["client_id"], body["sub"], body["scope"]) == (
        IMPORTER[0],
        IMPORTER[0],
        "catalog:import",
    )


async def test_introspection_of_refresh_tokens_follows_their_life(
    client: httpx.AsyncClient,
) -> None:
    account, tokens = await registered_and_logged_in(client)
    body = await introspect(client, tokens.refresh)
    assert body["active"] is True
    assert body["sub"] == account.id
    assert body["sid"] == jwt.get_unverified_claims(tokens.access)["sid"]
    assert body["exp"] - body["iat"] == pytest.approx(14 * 24 * 3600, abs=5)
    await client.post("/auth/refresh", json={"refresh_token": tokens.refresh})
    assert await introspect(client, tokens.refresh) == {"active": False}


async def test_garbage_introspects_as_inactive(client: httpx.AsyncClient) -> None:
    # the last: a JWT whose header's alg is a list, which no set of algorithms holds
    unhashable_alg = "eyJhbGciOiBbIkVTMjU2Il0sICJraWQiOiAiayJ9.e30.AAAA"
    for token in ("made-up", "not.a.jwt", "x" * 4000, unhashable_alg):
        assert await introspect(client, token) == {"active": False}
    # a NUL byte is odd input for every field of every service, this one too
    nul = await client.post("/auth/introspect", data={"token": "\x00"}, auth=RESOURCE_SERVER)
    assert_problem(nul, 422)


async def test_introspection_needs_a_client_allowed_to_introspect(
    client: httpx.AsyncClient,
) -> None:
    _, tokens = await registered_and_logged_in(client)
    anonymous = await client.post("/auth/introspect", data={"token": tokens.access})
    assert_oauth_error(anonymous, 401, "invalid_client")
    wrong = await client.post(
        "/auth/introspect", data={"token": tokens.access}, auth=(RESOURCE_SERVER[0], "nope")
    )
    assert_oauth_error(wrong, 401, "invalid_client")
    importer = await client.post("/auth/introspect", data={"token": tokens.access}, auth=IMPORTER)
    assert_oauth_error(importer, 400, "unauthorized_client")
    as_user = await client.post(
        "/auth/introspect", data={"token": tokens.access}, headers=tokens.headers
    )
    assert_oauth_error(as_user, 401, "invalid_client")


# --- userinfo -------------------------------------------------------------------------------


async def test_userinfo_answers_the_standard_claims(client: httpx.AsyncClient) -> None:
    account, tokens = await registered_and_logged_in(client)
    for response in (
        await client.get("/auth/userinfo", headers=tokens.headers),
        await client.post("/auth/userinfo", headers=tokens.headers),
    ):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body.pop("updated_at") > 0
        assert body == {
            "sub": account.id,
            "name": account.display_name,
            "email": account.email,
            "email_verified": False,
        }


async def test_userinfo_says_a_confirmed_address_is_verified(
    client: httpx.AsyncClient, mail: MailCatcher
) -> None:
    account = await register(client)
    (welcome,) = await mail.wait_for(account.email)
    confirmed = await client.post("/auth/email/verify", json={"token": emailed_token(welcome)})
    assert confirmed.status_code == 204, confirmed.text
    tokens = await login(client, account.email, account.password)
    response = await client.get("/auth/userinfo", headers=tokens.headers)
    assert response.status_code == 200, response.text
    assert response.json()["email_verified"] is True


async def test_userinfo_refuses_machine_tokens_and_anonymous_callers(
    client: httpx.AsyncClient,
) -> None:
    access = (await machine_token(client)).json()["access_token"]
    response = await client.get("/auth/userinfo", headers={"Authorization": f"Bearer {access}"})
    assert_oauth_error(response, 403, "insufficient_scope")
    assert response.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", scope="openid"'
    )
    assert_problem(await client.get("/auth/userinfo"), 401)


# --- discovery ------------------------------------------------------------------------------


async def test_discovery_publishes_the_issuer_endpoints_and_algorithms(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    response = await client.get("/auth/.well-known/openid-configuration")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "public, max-age=300"
    body = response.json()
    _, tokens = await registered_and_logged_in(client)
    assert body["issuer"] == settings.jwt_issuer == jwt.get_unverified_claims(tokens.access)["iss"]
    base = "http://localhost:8000/auth"
    assert body["issuer"] == base
    assert body["token_endpoint"] == f"{base}/token"
    assert body["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert body["revocation_endpoint"] == f"{base}/revoke"
    assert body["introspection_endpoint"] == f"{base}/introspect"
    assert body["userinfo_endpoint"] == f"{base}/userinfo"
    assert body["grant_types_supported"] == ["password", "refresh_token", "client_credentials"]
    assert body["scopes_supported"] == [
        "openid",
        "profile",
        "email",
        "catalog:import",
        "catalog:read",
    ]
    assert body["access_token_signing_alg_values_supported"] == ["ES256"]
    assert "none" not in body["introspection_endpoint_auth_methods_supported"]
    assert body["response_types_supported"] == []

    metadata = await client.get("/auth/.well-known/oauth-authorization-server")
    assert metadata.content == response.content
    assert metadata.headers["etag"] == response.headers["etag"]


async def test_discovery_answers_304_to_its_etag(client: httpx.AsyncClient) -> None:
    first = await client.get("/auth/.well-known/openid-configuration")
    etag = first.headers["etag"]
    for presented in (etag, f'W/{etag}, "other"', "*"):
        again = await client.get(
            "/auth/.well-known/openid-configuration", headers={"If-None-Match": presented}
        )
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
    stale = await client.get(
        "/auth/.well-known/openid-configuration", headers={"If-None-Match": '"stale"'}
    )
    assert stale.status_code == 200


def test_discovery_urls_follow_the_public_base_url(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    public = settings.model_copy(
        update={
            "public_base_url": "https://shop.example.com/",
            "jwt_issuer": "https://shop.example.com/auth",
        }
    )
    metadata = server_metadata(public)
    assert metadata.issuer == "https://shop.example.com/auth"
    assert metadata.token_endpoint == "https://shop.example.com/auth/token"
    assert metadata.service_documentation == "https://shop.example.com/docs"
    with caplog.at_level(logging.WARNING, logger="auth.discovery"):
        warn_if_issuer_is_elsewhere(public)
        assert caplog.records == []
        warn_if_issuer_is_elsewhere(public.model_copy(update={"jwt_issuer": "bazaar-auth"}))
    assert "JWT_ISSUER=https://shop.example.com/auth" in caplog.text


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ({"3f2a5c1e-6a40-4c53-8d34-5a9f1e0c2b7d": {"secret": "s" * 16}}, "must not be a UUID"),
        ({"bad id": {"secret": "s" * 16}}, "client id"),
        ({"ok": {"secret": "short"}}, "at least 16"),
        ({"ok": {"secret": "s" * 16, "scopes": ["openid"]}}, "not for a machine client"),
        ({"ok": {"secret": "s" * 16, "scopes": ["has space"]}}, "pattern"),
    ],
)
def test_misconfigured_clients_stop_start_up(
    database_url: str, redis_url: str, clients: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(database_url, redis_url, oauth_clients=clients)


def test_the_public_base_url_is_an_origin(database_url: str, redis_url: str) -> None:
    with pytest.raises(ValidationError, match="no path"):
        make_settings(database_url, redis_url, public_base_url="https://shop.example.com/api")


async def test_openapi_documents_every_oauth_endpoint(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {
        "/auth/token": {"post"},
        "/auth/revoke": {"post"},
        "/auth/introspect": {"post"},
        "/auth/userinfo": {"get", "post"},
        "/auth/.well-known/openid-configuration": {"get"},
        "/auth/.well-known/oauth-authorization-server": {"get"},
    }.items() <= {path: set(operations) for path, operations in paths.items()}.items()
    form = paths["/auth/token"]["post"]["requestBody"]["content"]
    assert "application/x-www-form-urlencoded" in form
