"""`.env.example`, the settings classes, compose.yaml and the swarm stack
file agree.

Every field of every service's settings is documented; everything documented
is read by a service, by compose or by the stack file; the documented values
are the defaults of the classes, compose and the stack; every setting a
service reads reaches its containers from the environment (or a `.env`),
under compose and on a swarm alike.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from auth.config import Settings as AuthSettings
from catalog.config import Settings as CatalogSettings
from chat.config import Settings as ChatSettings
from gateway.config import Settings as GatewaySettings
from kit.migrations import MigrationSettings

from .compose import compose_services

ROOT = Path(__file__).resolve().parents[2]
STACK_FILE = ROOT / "deploy" / "swarm" / "stack.yaml"
SERVICES: dict[str, type[BaseSettings]] = {
    "auth": AuthSettings,
    "catalog": CatalogSettings,
    "chat": ChatSettings,
    "gateway": GatewaySettings,
    "migrate-auth": MigrationSettings,
    "migrate-catalog": MigrationSettings,
    "migrate-chat": MigrationSettings,
}
LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
# Right in every container without being passed: the container's host name
DERIVED = {"NODE_ID"}
# Secrets the `setup` step writes to files from its own same-named variable;
# the services read them as NAME_FILE
THROUGH_SETUP = {"REDIS_PASSWORD", "SIGNING_KEY"}
# A file on the operator's machine that compose mounts into `setup` (here, at
# this path), which copies it into the volume of the containers that read it;
# they read the copy, at a path of their own
MOUNTED_INTO_SETUP = {"SIGNING_KEY_FILE": "/input/signing-key"}
# Read by every service but set on purpose for some only: CORS headers come
# from the edge, or responses behind it would carry them twice. Compose passes
# the OpenTelemetry service name and resource attributes to none: one name
# would label every service the same (each defaults to its SERVICE_NAME), and
# the Docker CLI puts its own OTEL_RESOURCE_ATTRIBUTES in compose's
# environment, which interpolation would hand to every container.
ONLY_FOR: dict[str, set[str]] = {
    "CORS_ORIGINS": {"gateway"},
    "OTEL_SERVICE_NAME": set(),
    "OTEL_RESOURCE_ATTRIBUTES": set(),
}


def documented() -> dict[str, str | None]:
    """Name to documented value; None for a `# NAME=...` line compose sets per service."""
    names: dict[str, str | None] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = LINE.match(line)
        if match:
            commented, name, value = match.groups()
            names[name] = None if commented else value
    return names


def fields(settings: type[BaseSettings]) -> set[str]:
    return {name.upper() for name in settings.model_fields}


def compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text()))


def stack_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", STACK_FILE.read_text()))


def service_fields() -> set[str]:
    return set().union(*(fields(settings) for settings in SERVICES.values()))


def test_every_setting_is_documented() -> None:
    assert service_fields() - set(documented()) == set()


def test_everything_documented_is_read_by_a_service_or_by_compose() -> None:
    read = service_fields() | compose_variables() | stack_variables()
    assert set(documented()) - read == set()


def test_every_variable_the_stack_file_reads_is_documented() -> None:
    # set by `make swarm-up` itself: a new one at every deploy
    internal = {"DEPLOY_ID"}
    assert stack_variables() - set(documented()) - internal == set()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in documented():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize("service", ["auth", "catalog", "chat", "gateway"])
def test_documented_values_are_the_defaults(service: str) -> None:
    settings = SERVICES[service]
    defaults = settings(_env_file=None)
    for name, value in documented().items():
        field = name.lower()
        if value is None or field not in settings.model_fields:
            continue
        default = getattr(defaults, field)
        if value == "":
            assert default in (None, [], {}), name
        else:
            values: dict[str, Any] = {field: value}
            parsed = settings(_env_file=None, **values)
            assert getattr(parsed, field) == default, name


def resolved_services(env_file: Path) -> dict[str, dict[str, Any]]:
    return compose_services("--env-file", str(env_file))


def resolved_environments(env_file: Path) -> dict[str, dict[str, Any]]:
    return {
        name: service.get("environment") or {}
        for name, service in resolved_services(env_file).items()
    }


def mounted_into_setup(services: dict[str, dict[str, Any]], target: str) -> str | None:
    """The source of the file compose mounts into `setup` at `target`."""
    for volume in services["setup"].get("volumes", []):
        if volume.get("target") == target:
            return str(volume["source"])
    return None


def test_every_setting_reaches_the_containers_that_read_it(tmp_path: Path) -> None:
    overridable = {
        name for name, value in documented().items() if value is not None
    } & service_fields()
    env_file = tmp_path / "changed.env"
    env_file.write_text(
        "".join(
            # a file is named by its path (./name, or absolute), never a bare name
            f"{name}={'./' if name in MOUNTED_INTO_SETUP else ''}changed-{name}\n"
            for name in sorted(overridable)
        )
    )

    services = resolved_services(env_file)
    environments = {name: service.get("environment") or {} for name, service in services.items()}

    missing = []
    for service, settings in SERVICES.items():
        environment = environments[service]
        for name in sorted(fields(settings) - DERIVED):
            if service not in ONLY_FOR.get(name, {service}):
                reached = name not in environment
            elif name in MOUNTED_INTO_SETUP:
                source = mounted_into_setup(services, MOUNTED_INTO_SETUP[name])
                reached = source is not None and source.endswith(f"changed-{name}")
            elif name in THROUGH_SETUP:
                reached = f"{name}_FILE" in environment and (
                    environments["setup"].get(name) == f"changed-{name}"
                )
            elif name in overridable:
                reached = environment.get(name) == f"changed-{name}"
            else:  # set by compose per service, directly or as a file
                reached = name in environment or f"{name}_FILE" in environment
            if not reached:
                missing.append(f"{service}: {name}")
    assert missing == []


def test_compose_runs_with_the_documented_values(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")

    services = resolved_services(empty)
    environments = {name: service.get("environment") or {} for name, service in services.items()}

    passed_as_files = THROUGH_SETUP | set(MOUNTED_INTO_SETUP)
    for service, settings in SERVICES.items():
        environment = environments[service]
        for name, value in documented().items():
            passed = service in ONLY_FOR.get(name, {service})
            if value is not None and passed and name in fields(settings) - passed_as_files:
                assert environment[name] == value, f"{service}: {name}"
    # no key file given: `setup` reads nothing, and writes auth an empty one
    assert mounted_into_setup(services, MOUNTED_INTO_SETUP["SIGNING_KEY_FILE"]) == "/dev/null"


# On a swarm, secrets are Docker secrets read from files (no secret in the
# stack file or `docker service inspect`), and the gateway reaches replicas
# through tasks.<service>; everything else is the same as under compose.
SWARM_SECRETS = {"ADMIN_PASSWORD", "SIGNING_KEY"}
SWARM_FILES = {
    "REDIS_PASSWORD_FILE": "/run/secrets/redis-password",
    "DATABASE_PASSWORD_FILE": "/run/secrets/database-password",
    "DATABASE_SUPERUSER_PASSWORD_FILE": "/run/secrets/superuser-password",
    "ADMIN_PASSWORD_FILE": "/run/secrets/admin-password",
    "SIGNING_KEY_FILE": "/run/secrets/signing-key",
}
SWARM_UPSTREAMS = {
    "AUTH_UPSTREAM": "http://tasks.auth:8000",
    "CATALOG_UPSTREAM": "http://tasks.catalog:8000",
    "CHAT_UPSTREAM": "http://tasks.chat:8000",
}


def stack_environments(values: dict[str, str]) -> dict[str, dict[str, str]]:
    """`docker stack config` of the stack file with these variables only
    (it reads the process environment; it needs no swarm)."""
    clean = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    done = subprocess.run(
        ["docker", "stack", "config", "-c", str(STACK_FILE)],
        cwd=ROOT,
        env={**clean, **values},
        capture_output=True,
        text=True,
        check=True,
    )
    services: dict[str, dict[str, Any]] = yaml.safe_load(done.stdout)["services"]
    return {name: service.get("environment") or {} for name, service in services.items()}


def test_every_setting_reaches_the_swarm_services_that_read_it() -> None:
    overridable = {
        name for name, value in documented().items() if value is not None
    } & service_fields()

    environments = stack_environments({name: f"changed-{name}" for name in overridable})

    missing = []
    for service, settings in SERVICES.items():
        environment = environments[service]
        for name in sorted(fields(settings) - DERIVED):
            if service not in ONLY_FOR.get(name, {service}):
                reached = name not in environment
            elif name in THROUGH_SETUP or name in SWARM_SECRETS:
                reached = name not in environment and f"{name}_FILE" in environment
            elif name in SWARM_FILES:  # auth's own SIGNING_KEY_FILE: the secret's path
                reached = environment.get(name) == SWARM_FILES[name]
            elif name in overridable:
                reached = environment.get(name) == f"changed-{name}"
            else:
                reached = name in environment or f"{name}_FILE" in environment
            if not reached:
                missing.append(f"{service}: {name}")
    assert missing == []


def test_the_stack_runs_with_what_compose_runs_with(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    compose = resolved_environments(empty)

    stack = stack_environments({})

    for service in SERVICES:
        expected = {
            name: SWARM_FILES.get(name, SWARM_UPSTREAMS.get(name, str(value)))
            for name, value in compose[service].items()
            if name not in SWARM_SECRETS
        }
        for name in SWARM_SECRETS & set(compose[service]):
            expected[f"{name}_FILE"] = SWARM_FILES[f"{name}_FILE"]
        assert {k: str(v) for k, v in stack[service].items()} == expected, service
