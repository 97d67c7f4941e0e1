"""Auth's settings: kit's shared ones plus users, tokens, keys, throttling and mail."""

from __future__ import annotations

from pathlib import Path

from pydantic import EmailStr, Field, PostgresDsn, SecretStr, field_validator

from kit.settings import ServiceSettings

OWASP_ARGON2_MEMORY_KIB = 19_456
OWASP_ARGON2_TIME_COST = 2
OWASP_ARGON2_PARALLELISM = 1


class Settings(ServiceSettings):
    service_name: str = "auth"
    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://bazaar:bazaar@postgres:5432/auth")

    admin_email: EmailStr | None = None
    admin_password: SecretStr | None = None

    access_token_ttl_seconds: int = Field(default=900, gt=0)
    refresh_token_ttl_seconds: int = Field(default=14 * 24 * 3600, gt=0)

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
    # appended); without a link the email carries the token alone.
    password_reset_ttl_seconds: int = Field(default=1800, gt=0)
    password_reset_emails_per_account: int = Field(default=3, ge=1)
    password_reset_window_seconds: int = Field(default=3600, ge=1)
    password_reset_link: str | None = None

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
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose passes `${SMTP_URL:-}` through as an empty string
        return None if value == "" else value

    def signing_key_pem(self) -> str | None:
        """The configured private key, from the setting or the file it names."""
        if self.signing_key is not None:
            return self.signing_key.get_secret_value()
        if self.signing_key_file is not None:
            return self.signing_key_file.read_text()
        return None
