"""Auth's settings: kit's shared ones plus users, tokens, keys, throttling,
mail, the public URL and the OAuth clients."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Self

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    PostgresDsn,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from kit.settings import DatabaseSettings, is_weak_secret

OWASP_ARGON2_MEMORY_KIB = 19_456
OWASP_ARGON2_TIME_COST = 2
OWASP_ARGON2_PARALLELISM = 1


# RFC 6749 appendix A.4: a scope token is printable ASCII without space, `"` or `\\`
ScopeToken = Annotated[str, StringConstraints(pattern=r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")]
# What a user's access token is granted: OpenID Connect's claims about the user
USER_SCOPES = ("openid", "profile", "email")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
MIN_CLIENT_SECRET_LENGTH = 16


class OAuthClient(BaseModel):
    """A confidential (machine) client: it authenticates with its secret and
    may use the client_credentials grant for `scopes`; with `introspect` it
    may also ask `/auth/introspect` about tokens (a resource server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: Annotated[SecretStr, Field(min_length=MIN_CLIENT_SECRET_LENGTH, max_length=256)]
    scopes: tuple[ScopeToken, ...] = ()
    introspect: bool = False
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None

    @field_validator("scopes")
    @classmethod
    def _no_user_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        taken = sorted(set(value) & set(USER_SCOPES))
        if taken:
            raise ValueError(f"{', '.join(taken)}: scopes about a user, not for a machine client")
        return tuple(dict.fromkeys(value))


class Settings(DatabaseSettings):
    service_name: str = "auth"
    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://auth@postgres:5432/auth")
    # /auth/users/me's own connections (kit.point_pool), opened on first use
    point_read_pool_size: int = Field(default=5, ge=1)

    # The admin account ensured at start-up; without a password it is created
    # with a random one, printed once in the log.
    admin_email: EmailStr | None = "admin@example.com"
    admin_password: SecretStr | None = None

    access_token_ttl_seconds: int = Field(default=900, gt=0)
    # Each refresh token lives this long from its issue (sliding) ...
    refresh_token_ttl_seconds: int = Field(default=14 * 24 * 3600, gt=0)
    # ... but no login session outlives this, however often it is refreshed.
    session_max_lifetime_seconds: int = Field(default=30 * 24 * 3600, gt=0)

    # The private ES256 key as PEM, from a secret; without one a key is
    # generated once and kept in the database, shared by every replica.
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    # How long a replica trusts its cached key ring before re-reading it, so a
    # rotation made elsewhere reaches every replica.
    key_ring_refresh_seconds: float = Field(default=30.0, ge=0)

    argon2_memory_cost_kib: int = Field(default=OWASP_ARGON2_MEMORY_KIB, ge=8)
    argon2_time_cost: int = Field(default=OWASP_ARGON2_TIME_COST, ge=1)
    argon2_parallelism: int = Field(default=OWASP_ARGON2_PARALLELISM, ge=1)
    # Hashes computed at once per replica, each holding argon2_memory_cost_kib
    argon2_max_concurrent: int = Field(default=4, ge=1)

    # Login throttling (throttle.py): attempts are counted before the password
    # is checked, per (account, client address) and per client address within
    # `login_failure_window_seconds`, and per account across every address
    # within `login_account_window_seconds`; past that last limit attempts on
    # the account are spaced by a delay doubling up to
    # `login_account_delay_max_seconds`, never locked. While Redis is
    # unreachable each replica counts alone, against this fraction of each limit.
    login_failures_per_account_and_client: int = Field(default=5, ge=1)
    login_failures_per_client: int = Field(default=20, ge=1)
    login_failure_window_seconds: int = Field(default=900, ge=1)
    login_failures_per_account: int = Field(default=100, ge=1)
    login_account_window_seconds: int = Field(default=3600, ge=1)
    login_account_delay_max_seconds: int = Field(default=60, ge=1)
    login_throttle_fallback_fraction: float = Field(default=0.5, gt=0, le=1)

    users_page_max: int = Field(default=100, ge=1)

    # Password resets: how long an emailed token stays valid, how many reset
    # emails one account gets per window (more requests are accepted, and
    # silently send nothing), and the page the email links to (`?token=` is
    # appended); unset, the web client's page on PUBLIC_BASE_URL.
    password_reset_ttl_seconds: int = Field(default=1800, gt=0)
    password_reset_emails_per_account: int = Field(default=3, ge=1)
    password_reset_window_seconds: int = Field(default=3600, ge=1)
    password_reset_link: str | None = None

    # Where clients outside reach the gateway (scheme, host and port, no
    # path): the discovery document's endpoints are built on it. JWT_ISSUER
    # should be this plus `/auth`, so that discovery is served at
    # `<issuer>/.well-known/openid-configuration`.
    public_base_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8000")

    # Confidential clients by client_id, as JSON, for example
    # {"catalog-importer": {"secret": "...", "scopes": ["catalog:import"]},
    #  "reports": {"secret": "...", "introspect": true}}.
    oauth_clients: dict[str, OAuthClient] = Field(default_factory=dict)
    # Email verification: a registration emails a single-use link valid this
    # long; resends are limited per address and window like reset emails.
    # The link: as for resets, the web client's page unless set.
    email_verification_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    email_verification_emails_per_account: int = Field(default=3, ge=1)
    email_verification_window_seconds: int = Field(default=3600, ge=1)
    email_verification_link: str | None = None
    # Refresh, reset and verification tokens a day past their expiry are
    # deleted this often (each replica, in batches): every login and every
    # refresh adds a row, and nothing reads an expired one.
    token_purge_interval_seconds: float = Field(default=600.0, gt=0)

    smtp_url: SecretStr | None = None
    mail_from: str = "Bazaar <no-reply@bazaar.invalid>"
    smtp_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator(
        "admin_email",
        "admin_password",
        "signing_key",
        "signing_key_file",
        "smtp_url",
        "password_reset_link",
        "email_verification_link",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose passes `${SMTP_URL:-}` through as an empty string
        return None if value == "" else value

    @field_validator("public_base_url")
    @classmethod
    def _origin_only(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.path not in (None, "", "/") or value.query or value.fragment:
            raise ValueError("must be scheme://host[:port] with no path, query or fragment")
        return value

    @field_validator("oauth_clients")
    @classmethod
    def _plain_client_ids(cls, value: dict[str, OAuthClient]) -> dict[str, OAuthClient]:
        for client_id in value:
            if not _CLIENT_ID.match(client_id):
                raise ValueError(f"client id {client_id!r}: 1-64 of A-Z a-z 0-9 . _ ~ -")
            # a client's tokens carry its id as `sub`; a UUID could be a user's
            try:
                uuid.UUID(client_id)
            except ValueError:
                continue
            raise ValueError(f"client id {client_id!r} must not be a UUID (users' ids are)")
        return value

    @property
    def public_origin(self) -> str:
        """`public_base_url` without its trailing slash."""
        return str(self.public_base_url).rstrip("/")

    @property
    def reset_page(self) -> str:
        """Where a reset email links to: the setting, or the web client's page."""
        return self.password_reset_link or f"{self.public_origin}/password/reset"

    @property
    def verification_page(self) -> str:
        """Where a verification email links to: the setting, or the web client's page."""
        return self.email_verification_link or f"{self.public_origin}/email/verify"

    @model_validator(mode="after")
    def _tokens_within_the_verifiers_maximum(self) -> Self:
        if self.access_token_ttl_seconds > self.jwt_max_lifetime_seconds:
            raise ValueError(
                "ACCESS_TOKEN_TTL_SECONDS must not exceed JWT_MAX_LIFETIME_SECONDS: "
                "every verifier would refuse such tokens"
            )
        return self

    def weak_production_secrets(self) -> list[str]:
        weak = super().weak_production_secrets()
        # unset is fine: the admin then gets a random password
        if self.admin_password is not None and is_weak_secret(
            self.admin_password.get_secret_value()
        ):
            weak.append("ADMIN_PASSWORD")
        return weak

    def signing_key_pem(self) -> str | None:
        """The configured private key, from the setting or the file it names
        (an empty file names none: compose's `setup` writes one when no key
        was given)."""
        if self.signing_key is not None:
            return self.signing_key.get_secret_value()
        if self.signing_key_file is not None:
            return self.signing_key_file.read_text().strip() or None
        return None
