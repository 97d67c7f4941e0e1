"""Who is calling an OAuth endpoint: client authentication (RFC 6749 section 2.3).

Confidential clients are configured in `OAUTH_CLIENTS` and prove who they
are with their secret, in HTTP Basic (`client_secret_basic`, the default of
most libraries) or in the form (`client_secret_post`), never both. Every
other caller is a public client (an app a person logs in with): it may name
itself with `client_id`, which is not checked, but it may not use a
confidential client's id without that client's secret.

Secrets are compared with `secrets.compare_digest`, and an unknown client id
is compared against a dummy secret, so the time taken tells nothing about
which ids exist or how much of a secret matched.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from urllib.parse import unquote_plus

from auth.config import OAuthClient, Settings
from auth.errors import InvalidClient, InvalidRequest

_DUMMY_SECRET = secrets.token_urlsafe(32).encode()


@dataclass(frozen=True, slots=True)
class Caller:
    """The client behind a request; `config` is set for an authenticated
    confidential client and None for a public one."""

    client_id: str | None
    config: OAuthClient | None = None

    @property
    def confidential(self) -> bool:
        return self.config is not None


def _basic_credentials(authorization: str | None) -> list[tuple[str, str]] | None:
    """The (id, secret) readings of a Basic header; None without one.

    RFC 6749 section 2.3.1 form-encodes both before Base64, which conformant
    libraries do; many hand-made clients (`curl -u`) do not. Both readings are
    tried, since each is exactly one secret.
    """
    if authorization is None:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except ValueError as error:  # binascii.Error, UnicodeDecodeError, non-ASCII input
        raise InvalidClient("Malformed Basic credentials") from error
    raw_id, separator, raw_secret = decoded.partition(":")
    if not separator:
        raise InvalidClient("Malformed Basic credentials")
    if not raw_id and not raw_secret:
        # Swagger UI sends `Basic Og==` (":") when no client id was typed in
        return []
    readings = [(unquote_plus(raw_id), unquote_plus(raw_secret))]
    if readings[0] != (raw_id, raw_secret):
        readings.append((raw_id, raw_secret))
    return readings


def _secret_matches(client: OAuthClient | None, presented: str) -> bool:
    expected = _DUMMY_SECRET if client is None else client.secret.get_secret_value().encode()
    return secrets.compare_digest(presented.encode(), expected) and client is not None


def authenticate_client(
    *,
    settings: Settings,
    authorization: str | None,
    client_id: str | None,
    client_secret: str | None,
) -> Caller:
    """The caller, authenticated if it presented a secret; raises InvalidClient
    for wrong or missing credentials of a confidential client."""
    basic = _basic_credentials(authorization)
    if basic and client_secret is not None:
        raise InvalidRequest("Use one client authentication method: Basic or the form, not both")
    if basic:
        candidates = basic
    elif client_secret is not None:
        if client_id is None:
            raise InvalidClient("client_secret was sent without client_id")
        candidates = [(client_id, client_secret)]
    else:
        if client_id is not None and client_id in settings.oauth_clients:
            raise InvalidClient("This client must authenticate with its secret")
        return Caller(client_id)
    if basic and client_id is not None and all(client_id != known for known, _ in basic):
        raise InvalidRequest("client_id in the form differs from the Basic credentials")
    for known_id, secret in candidates:
        config = settings.oauth_clients.get(known_id)
        if _secret_matches(config, secret):
            return Caller(known_id, config)
    raise InvalidClient("Unknown client or wrong client secret")
