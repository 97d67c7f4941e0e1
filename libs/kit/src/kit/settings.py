"""Settings every service shares; each service subclasses `ServiceSettings`.

Order of precedence: environment, then `.env`, then the defaults here, which
are the values compose.yaml runs with, so `docker compose up` needs no `.env`.
"""

from __future__ import annotations

import socket
from typing import Annotated

from pydantic import AnyHttpUrl, Field, RedisDsn, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The issuer identifier: auth's public URL through the gateway on its default
# port. OpenID Connect and RFC 8414 clients find the discovery document at
# `<issuer>/.well-known/openid-configuration`, so it must be a URL they can reach.
DEFAULT_JWT_ISSUER = "http://localhost:8000/auth"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ServiceSettings(BaseSettings):
    # env_ignore_empty: compose passes `${VAR:-}` as an empty string, which means "unset"
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, env_ignore_empty=True
    )

    service_name: str = "service"
    log_level: str = "INFO"
    node_id: str = Field(default_factory=socket.gethostname)

    redis_url: RedisDsn = RedisDsn("redis://redis:6379/0")

    jwt_issuer: str = DEFAULT_JWT_ISSUER
    jwt_audience: str = "bazaar"
    jwks_url: AnyHttpUrl = AnyHttpUrl("http://auth:8000/auth/.well-known/jwks.json")
    jwt_algorithms: Annotated[list[str], NoDecode] = ["ES256"]
    # The longest time between two fetches of the key set (a shorter
    # `Cache-Control: max-age` on the JWKS wins): a key auth stops publishing
    # is no longer trusted after this long.
    jwks_refresh_seconds: float = Field(default=60.0, ge=5)
    # While Redis cannot be asked, revocations are answered from the local
    # mirror's last sync for this long; then authenticated requests get 503.
    revocation_max_staleness_seconds: float = Field(default=30.0, ge=0)

    metrics_user: str | None = None
    metrics_password: SecretStr | None = None

    cors_origins: Annotated[list[str], NoDecode] = []
    trusted_hosts: Annotated[list[str], NoDecode] = ["*"]
    max_body_bytes: int = Field(default=1_048_576, gt=0)

    @field_validator("cors_origins", "trusted_hosts", "jwt_algorithms", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)
