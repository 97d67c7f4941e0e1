"""Settings every service shares; each service subclasses `ServiceSettings`.

Order of precedence: the environment, then `<NAME>_FILE` in the environment (a
file holding the value, the way Docker and Kubernetes mount secrets), then
`.env`, then the defaults here, which are the values compose.yaml runs with, so
`docker compose up` needs no `.env`.

Passwords have settings of their own (`DATABASE_PASSWORD`, `REDIS_PASSWORD`)
that are merged into the URLs, so a URL can stay in plain configuration while
its password comes from a secret file.

With `ENVIRONMENT=production` a service refuses to start while a secret it
relies on is empty or a well-known default, and says which setting to set.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    AnyHttpUrl,
    Field,
    PostgresDsn,
    RedisDsn,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from kit.logs import FLUSH_SECONDS

Environment = Literal["development", "production"]

# Every value this project ever shipped as a default, and the usual placeholders.
WELL_KNOWN_SECRETS = frozenset(
    {
        "",
        "admin",
        "bazaar",
        "change-me",
        "change-me-admin",
        "changeme",
        "changethis",
        "password",
        "postgres",
        "redis",
        "secret",
    }
)

# The issuer identifier: auth's public URL through the gateway on its default
# port. OpenID Connect and RFC 8414 clients find the discovery document at
# `<issuer>/.well-known/openid-configuration`, so it must be a URL they can reach.
DEFAULT_JWT_ISSUER = "http://localhost:8000/auth"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def url_with_password(url: str, password: str) -> str:
    """`url` with its password replaced (the user name, host and path kept)."""
    parts = urlsplit(url)
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return None if password is None else unquote(password)


def is_weak_secret(value: str | None) -> bool:
    """Empty, or a default anyone can look up."""
    return value is None or value.strip().lower() in WELL_KNOWN_SECRETS


class FileValues(PydanticBaseSettingsSource):
    """`<NAME>_FILE=/path` in the environment: the setting's value is the file's
    content, without its final newline; an empty file leaves it unset. A setting that is itself declared with
    a `_file` suffix (auth's `SIGNING_KEY_FILE`) keeps its own meaning. Lists
    and dicts are JSON, as in the environment, unless declared `NoDecode`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{field_name.upper()}_FILE"
        path = os.environ.get(variable, "")
        if not path or f"{field_name}_file" in self.settings_cls.model_fields:
            return None, field_name, False
        try:
            content = Path(path).read_text()
        except OSError as error:
            raise SettingsError(f"{variable}: cannot read {path}: {error.strerror}") from None
        value = content.removesuffix("\n").removesuffix("\r")
        # an empty file is an unset setting, as an empty variable is
        # (a Kubernetes Secret's empty key switches an optional setting off)
        return (value or None), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, complex_ = self.get_field_value(field, name)
            if value is not None:
                # JSON for lists and dicts (OAUTH_CLIENTS), as from the environment
                values[key] = self.prepare_field_value(name, field, value, complex_)
        return values


class SettingsBase(BaseSettings):
    """Sources, `ENVIRONMENT` and the production check; no service fields."""

    # env_ignore_empty: compose passes `${VAR:-}` as an empty string, which means "unset";
    # hide_input_in_errors: a refused setting must not print the secrets beside it
    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    # (URL field, password field): the password, when set, replaces the URL's
    url_passwords: ClassVar[tuple[tuple[str, str], ...]] = ()

    environment: Environment = "development"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            FileValues(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @model_validator(mode="before")
    @classmethod
    def _passwords_into_urls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for url_field, password_field in cls.url_passwords:
            password = data.get(password_field)
            if isinstance(password, SecretStr):
                password = password.get_secret_value()
            if not password:
                continue
            url = data.get(url_field) or cls.model_fields[url_field].default
            data = {**data, url_field: url_with_password(str(url), password)}
        return data

    def weak_production_secrets(self) -> list[str]:
        """The settings that must not be empty or a default in production."""
        return []

    @model_validator(mode="after")
    def _refuse_weak_secrets_in_production(self) -> Self:
        if self.environment != "production":
            return self
        weak = self.weak_production_secrets()
        if weak:
            raise ValueError(
                "ENVIRONMENT=production refuses to start with an empty or well-known "
                f"secret; set {', '.join(weak)} (or the same name with _FILE)"
            )
        return self


class ServiceSettings(SettingsBase):
    url_passwords: ClassVar[tuple[tuple[str, str], ...]] = (("redis_url", "redis_password"),)

    service_name: str = "service"
    log_level: str = "INFO"
    # json: one object per line, for collectors; text: for people at a terminal
    log_format: Literal["json", "text"] = "json"
    # the access log's lines (kit.accesslog); off, every other INFO line stays
    access_log: bool = True
    # lines logged on the event loop wait up to this long to share one write
    # (kit.logs); 0: written at the end of the loop's turn
    log_flush_seconds: float = Field(default=FLUSH_SECONDS, ge=0, le=1)
    node_id: str = Field(default_factory=socket.gethostname)

    redis_url: RedisDsn = RedisDsn("redis://redis:6379/0")
    redis_password: SecretStr | None = None

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
    # Verifiers refuse a token whose `exp - iat` is longer than this.
    jwt_max_lifetime_seconds: int = Field(default=3600, gt=0)

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
    # Head sampling: one trace in ten, decided where the trace starts (the
    # gateway, for client requests) and followed by every service below it.
    # The specification's defaults are parentbased_always_on and 1.0; ours
    # keep tracing's cost within 10% of a read's throughput (docs/design.md).
    otel_traces_sampler: str = "parentbased_traceidratio"
    otel_traces_sampler_arg: float = Field(default=0.1, ge=0, le=1)
    otel_resource_attributes: str | None = None
    otel_bsp_schedule_delay: float = Field(default=5000, gt=0)
    otel_sdk_disabled: bool = False
    otel_service_name: str | None = None

    @field_validator("cors_origins", "trusted_hosts", "jwt_algorithms", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)

    def weak_production_secrets(self) -> list[str]:
        weak = super().weak_production_secrets()
        if is_weak_secret(url_password(str(self.redis_url))):
            weak.append("REDIS_PASSWORD")
        if not self.metrics_user:
            weak.append("METRICS_USER")
        password = self.metrics_password
        if is_weak_secret(None if password is None else password.get_secret_value()):
            weak.append("METRICS_PASSWORD")
        return weak


class DatabaseSettings(ServiceSettings):
    """A service that owns a PostgreSQL database (each overrides the URL's default)."""

    url_passwords: ClassVar[tuple[tuple[str, str], ...]] = (
        *ServiceSettings.url_passwords,
        ("database_url", "database_password"),
    )

    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://service@postgres:5432/service")
    database_password: SecretStr | None = None

    # Connections per replica (docs/operations.md has the budget: replicas x
    # pools within PostgreSQL's max_connections). Connections beyond the pool
    # are closed on return: under a burst they would be opened and closed per
    # request (TCP + SCRAM each), so by default there are none.
    database_pool_size: int = Field(default=10, ge=1)
    database_pool_overflow: int = Field(default=0, ge=0)
    # The longest a statement of a request may run, lock waits included;
    # PostgreSQL cancels it then and the request answers 503 (retry). Below
    # the gateway's route timeouts (10 s), so a client hears the service's
    # answer, not the gateway's 504; 0 leaves the database's own setting.
    database_statement_timeout_seconds: float = Field(default=5.0, ge=0)
    # The longest a service waits for any answer from PostgreSQL, the
    # statement timeout's own cancel included, before it gives the connection
    # up: a frozen or partitioned database answers nothing, not even the
    # statement timeout, and without this bound a request (and its pooled
    # connection) would wait until the network gave up, many minutes later.
    # Past it the request answers 503 and the connection is closed. Above the
    # statement timeout, so a slow statement is the server's to cancel (its
    # connection is kept); 0 waits for good.
    database_command_timeout_seconds: float = Field(default=6.0, ge=0)

    @model_validator(mode="after")
    def _command_timeout_outlasts_the_statement_timeout(self) -> Self:
        command = self.database_command_timeout_seconds
        statement = self.database_statement_timeout_seconds
        if command and statement and command <= statement:
            raise ValueError(
                f"DATABASE_COMMAND_TIMEOUT_SECONDS ({command:g}) must exceed"
                f" DATABASE_STATEMENT_TIMEOUT_SECONDS ({statement:g}): the server"
                " cancels a slow statement, the client only gives up on a silent server"
            )
        return self

    @property
    def database_server_settings(self) -> dict[str, str]:
        """What every connection of the service asks PostgreSQL for when it opens."""
        milliseconds = round(self.database_statement_timeout_seconds * 1000)
        return {"statement_timeout": str(milliseconds)} if milliseconds else {}

    @property
    def database_connect_options(self) -> dict[str, Any]:
        """How every connection of the service opens (asyncpg's `connect`
        arguments): PostgreSQL's settings and the driver's command timeout."""
        options: dict[str, Any] = {"server_settings": self.database_server_settings}
        if self.database_command_timeout_seconds:
            options["command_timeout"] = self.database_command_timeout_seconds
        return options

    def weak_production_secrets(self) -> list[str]:
        weak = super().weak_production_secrets()
        if is_weak_secret(url_password(str(self.database_url))):
            weak.append("DATABASE_PASSWORD")
        return weak


class VerifiedWritesSettings(ServiceSettings):
    """A service whose writes may be kept to users with a verified email."""

    # unset: required in production, not in development
    require_verified_email: bool | None = None

    @property
    def verified_email_required(self) -> bool:
        if self.require_verified_email is None:
            return self.environment == "production"
        return self.require_verified_email
