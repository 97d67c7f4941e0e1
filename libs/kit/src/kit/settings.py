"""Settings every service shares; each service subclasses `ServiceSettings`.

Order of precedence: environment, then `.env`, then the defaults here, which
are the values compose.yaml runs with, so `docker compose up` needs no `.env`.
"""

from __future__ import annotations

import socket
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, Field, RedisDsn, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
    # json: one object per line, for collectors; text: for people at a terminal
    log_format: Literal["json", "text"] = "json"
    node_id: str = Field(default_factory=socket.gethostname)

    redis_url: RedisDsn = RedisDsn("redis://redis:6379/0")

    jwt_issuer: str = "bazaar-auth"
    jwt_audience: str = "bazaar"
    jwks_url: AnyHttpUrl = AnyHttpUrl("http://auth:8000/auth/.well-known/jwks.json")
    jwt_algorithms: Annotated[list[str], NoDecode] = ["ES256"]

    metrics_user: str | None = None
    metrics_password: SecretStr | None = None

    cors_origins: Annotated[list[str], NoDecode] = []
    trusted_hosts: Annotated[list[str], NoDecode] = ["*"]
    max_body_bytes: int = Field(default=1_048_576, gt=0)

    # Tracing (kit.tracing), by the standard OpenTelemetry variables: on when an
    # OTLP endpoint is set. The SDK also reads the few not listed here
    # (OTEL_EXPORTER_OTLP_TIMEOUT, _COMPRESSION, _CERTIFICATE, OTEL_BSP_MAX_*).
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_exporter_otlp_protocol: str = "http/protobuf"
    otel_exporter_otlp_traces_protocol: str | None = None
    # `key=value,key2=value2` (W3C baggage form, values URL-encoded)
    otel_exporter_otlp_headers: str | None = None
    otel_traces_exporter: str = "otlp"
    otel_traces_sampler: str = "parentbased_always_on"
    otel_traces_sampler_arg: float = Field(default=1.0, ge=0, le=1)
    otel_resource_attributes: str | None = None
    otel_bsp_schedule_delay: float = Field(default=5000, gt=0)
    otel_sdk_disabled: bool = False
    otel_service_name: str | None = None

    @field_validator("cors_origins", "trusted_hosts", "jwt_algorithms", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)
