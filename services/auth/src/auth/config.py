"""Auth's settings: kit's shared ones plus users, tokens, keys, throttling and mail."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import EmailStr, Field, PostgresDsn, SecretStr, field_validator, model_validator

from kit.settings import DatabaseSettings, is_weak_secret

OWASP_ARGON2_MEMORY_KIB = 19_456
OWASP_ARGON2_TIME_COST = 2
OWASP_ARGON2_PARALLELISM = 1


class Settings(DatabaseSettings):
    service_name: str = "auth"
    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://auth@postgres:5432/auth")

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

    # Failed logins counted per account and per client address within the
    # window; past the limit, logins answer 429 until the window ends.
    login_failures_per_account: int = Field(default=5, ge=1)
    login_failures_per_client: int = Field(default=20, ge=1)
    login_failure_window_seconds: int = Field(default=900, ge=1)

    users_page_max: int = Field(default=100, ge=1)

    # Password resets: how long an emailed token stays valid, how many reset
    # emails one account gets per window (more requests are accepted, and
    # silently send nothing), and the page the email links to (`?token=` is
    # appended); without a link the email carries the token alone.
    password_reset_ttl_seconds: int = Field(default=1800, gt=0)
    password_reset_emails_per_account: int = Field(default=3, ge=1)
    password_reset_window_seconds: int = Field(default=3600, ge=1)
    password_reset_link: str | None = None

    # Email verification: a registration emails a single-use link valid this
    # long; resends are limited per address and window like reset emails.
    email_verification_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    email_verification_emails_per_account: int = Field(default=3, ge=1)
    email_verification_window_seconds: int = Field(default=3600, ge=1)
    email_verification_link: str | None = None

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
        """The configured private key, from the setting or the file it names."""
        if self.signing_key is not None:
            return self.signing_key.get_secret_value()
        if self.signing_key_file is not None:
            return self.signing_key_file.read_text()
        return None
