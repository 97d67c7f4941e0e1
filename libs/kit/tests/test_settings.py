from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, ValidationError
from pydantic_settings import SettingsError

from kit.settings import (
    DatabaseSettings,
    ServiceSettings,
    VerifiedWritesSettings,
    url_with_password,
)

STRONG = "Zr8-Qx2vLw7pTn4kYb9c"


def production(**values: object) -> dict[str, object]:
    return {
        "environment": "production",
        "redis_password": STRONG,
        "metrics_user": "scraper",
        "metrics_password": STRONG + "m",
        **values,
    }


def test_a_password_from_a_file_is_merged_into_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "database-password"
    secret.write_text("s3cret/with:odd@chars\n")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://auth@postgres:5432/auth")
    monkeypatch.setenv("DATABASE_PASSWORD_FILE", str(secret))

    settings = DatabaseSettings()

    assert str(settings.database_url) == (
        "postgresql+asyncpg://auth:s3cret%2Fwith%3Aodd%40chars@postgres:5432/auth"
    )
    assert settings.database_password is not None
    assert settings.database_password.get_secret_value() == "s3cret/with:odd@chars"


def test_the_environment_wins_over_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("from-the-file")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("REDIS_PASSWORD", "from-the-environment")

    assert str(ServiceSettings().redis_url) == "redis://:from-the-environment@redis:6379/0"


def test_an_unreadable_file_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD_FILE", "/nonexistent/redis-password")

    with pytest.raises(SettingsError, match="REDIS_PASSWORD_FILE: cannot read"):
        ServiceSettings()


def test_any_setting_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    value = tmp_path / "max-body"
    value.write_text("2048\n")
    monkeypatch.setenv("MAX_BODY_BYTES_FILE", str(value))

    assert ServiceSettings().max_body_bytes == 2048


def test_a_structured_setting_from_a_file_is_json_like_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Clients(ServiceSettings):
        clients: dict[str, list[str]] = Field(default_factory=dict)

    value = tmp_path / "clients"
    value.write_text('{"importer": ["catalog:import"]}\n')
    monkeypatch.setenv("CLIENTS_FILE", str(value))
    hosts = tmp_path / "hosts"
    hosts.write_text("a.example, b.example\n")
    monkeypatch.setenv("TRUSTED_HOSTS_FILE", str(hosts))

    settings = Clients(_env_file=None)

    assert settings.clients == {"importer": ["catalog:import"]}
    # a comma-separated setting stays comma-separated
    assert settings.trusted_hosts == ["a.example", "b.example"]


def test_an_empty_file_leaves_its_setting_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "metrics-password"
    empty.write_text("\n")
    monkeypatch.setenv("METRICS_PASSWORD_FILE", str(empty))

    assert ServiceSettings(_env_file=None).metrics_password is None


def test_a_password_replaces_the_one_in_the_url() -> None:
    settings = DatabaseSettings(
        database_url="postgresql+asyncpg://chat:old@db:5432/chat",  # type: ignore[arg-type]
        database_password="new",  # type: ignore[arg-type]
    )

    assert str(settings.database_url) == "postgresql+asyncpg://chat:new@db:5432/chat"


def test_url_with_password_keeps_the_user_and_host() -> None:
    assert url_with_password("redis://redis:6379/0", "p w") == "redis://:p%20w@redis:6379/0"
    assert url_with_password("redis://u:x@[::1]:6379/2", "y") == "redis://u:y@[::1]:6379/2"


def test_development_starts_with_default_secrets() -> None:
    settings = DatabaseSettings(_env_file=None)

    assert settings.environment == "development"


def test_production_names_every_empty_or_default_secret() -> None:
    with pytest.raises(ValidationError) as refused:
        DatabaseSettings(
            _env_file=None,
            environment="production",
            database_url="postgresql+asyncpg://auth:bazaar@postgres:5432/auth",  # type: ignore[arg-type]
            metrics_password="change-me",  # type: ignore[arg-type]
        )

    message = str(refused.value)
    for name in ("REDIS_PASSWORD", "METRICS_USER", "METRICS_PASSWORD", "DATABASE_PASSWORD"):
        assert name in message
    # the refusal prints no value, weak or not
    assert "change-me" not in message
    assert "bazaar@" not in message


def test_production_starts_with_real_secrets() -> None:
    settings = DatabaseSettings(
        _env_file=None,
        **production(database_password=STRONG + "d"),  # type: ignore[arg-type]
    )

    assert settings.environment == "production"


def test_a_verified_email_is_required_in_production_unless_set() -> None:
    assert not VerifiedWritesSettings(_env_file=None).verified_email_required
    assert VerifiedWritesSettings(
        _env_file=None,
        **production(),  # type: ignore[arg-type]
    ).verified_email_required
    assert not VerifiedWritesSettings(
        _env_file=None,
        **production(require_verified_email=False),  # type: ignore[arg-type]
    ).verified_email_required
    assert VerifiedWritesSettings(
        _env_file=None,
        require_verified_email=True,
    ).verified_email_required


def test_refusals_print_no_secret() -> None:
    with pytest.raises(ValidationError) as malformed:
        DatabaseSettings(
            _env_file=None,
            database_url="postgresql+asyncpg://auth:url-secret@postgres:port/auth",  # type: ignore[arg-type]
        )
    with pytest.raises(ValidationError) as refused:
        DatabaseSettings(
            _env_file=None,
            environment="production",
            redis_password="the-redis-secret",  # type: ignore[arg-type]
            database_password="the-database-secret",  # type: ignore[arg-type]
        )

    assert "database_url" in str(malformed.value)
    assert "url-secret" not in str(malformed.value)
    assert "METRICS_PASSWORD" in str(refused.value)
    assert "the-redis-secret" not in str(refused.value)
    assert "the-database-secret" not in str(refused.value)


def test_the_command_timeout_outlasts_the_statement_timeout() -> None:
    settings = DatabaseSettings(_env_file=None)
    assert settings.database_connect_options == {
        "server_settings": {"statement_timeout": "5000"},
        "command_timeout": 6.0,
    }
    with pytest.raises(ValidationError, match="must exceed DATABASE_STATEMENT_TIMEOUT_SECONDS"):
        DatabaseSettings(
            _env_file=None,
            database_statement_timeout_seconds=10,
            database_command_timeout_seconds=6,
        )
    # either one off: nothing to compare
    unbounded = DatabaseSettings(_env_file=None, database_command_timeout_seconds=0)
    assert unbounded.database_connect_options == {"server_settings": {"statement_timeout": "5000"}}
    by_the_client = DatabaseSettings(_env_file=None, database_statement_timeout_seconds=0)
    assert by_the_client.database_connect_options == {
        "server_settings": {},
        "command_timeout": 6.0,
    }
