"""The discovery document: RFC 8414 authorization-server metadata, served
both there and as OpenID Connect Discovery's `openid-configuration`.

Every URL in it is built on PUBLIC_BASE_URL, the address clients outside use
to reach the gateway, and `issuer` is JWT_ISSUER, the `iss` of every token.
"""

from __future__ import annotations

import hashlib
import json
import logging

from auth.config import USER_SCOPES, Settings
from auth.grants import GRANT_TYPES
from auth.keys import ALGORITHM
from auth.schemas import ServerMetadata

logger = logging.getLogger("auth.discovery")

CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
# `none`: public clients (the apps people log in with) send no secret
PUBLIC_AUTH_METHODS = [*CLIENT_AUTH_METHODS, "none"]
USERINFO_CLAIMS = ["sub", "name", "updated_at", "email", "email_verified"]
CACHE_CONTROL = "public, max-age=300"


def server_metadata(settings: Settings) -> ServerMetadata:
    base = f"{settings.public_origin}/auth"
    client_scopes = sorted(
        {scope for client in settings.oauth_clients.values() for scope in client.scopes}
    )
    return ServerMetadata(
        issuer=settings.jwt_issuer,
        token_endpoint=f"{base}/token",
        jwks_uri=f"{base}/.well-known/jwks.json",
        revocation_endpoint=f"{base}/revoke",
        introspection_endpoint=f"{base}/introspect",
        userinfo_endpoint=f"{base}/userinfo",
        service_documentation=f"{settings.public_origin}/docs",
        grant_types_supported=list(GRANT_TYPES),
        response_types_supported=[],
        scopes_supported=[*USER_SCOPES, *client_scopes],
        claims_supported=USERINFO_CLAIMS,
        subject_types_supported=["public"],
        token_endpoint_auth_methods_supported=PUBLIC_AUTH_METHODS,
        revocation_endpoint_auth_methods_supported=PUBLIC_AUTH_METHODS,
        introspection_endpoint_auth_methods_supported=CLIENT_AUTH_METHODS,
        access_token_signing_alg_values_supported=[ALGORITHM],
    )


def encoded_metadata(settings: Settings) -> tuple[bytes, str]:
    """The document's bytes and their strong ETag (the same on every replica
    with the same settings)."""
    body = json.dumps(
        server_metadata(settings).model_dump(), separators=(",", ":"), sort_keys=True
    ).encode()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def warn_if_issuer_is_elsewhere(settings: Settings) -> None:
    """OpenID Connect and RFC 8414 clients compare the issuer with the URL they
    fetched the document from, and refuse it when they differ."""
    expected = f"{settings.public_origin}/auth"
    if settings.jwt_issuer != expected:
        logger.warning(
            "JWT_ISSUER is %r but discovery is served under %r: clients that check the "
            "issuer will refuse the discovery document; set JWT_ISSUER=%s",
            settings.jwt_issuer,
            expected,
            expected,
        )
