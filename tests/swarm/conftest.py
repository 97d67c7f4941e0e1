"""The stack on a real Docker Swarm, deployed once per test run the way an
operator does (`deploy/swarm/up.sh`, which `make swarm-up` runs), under its
own stack name and gateway port, and removed with everything it created."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kit_testing import free_port

from ..e2e.failures import failed, pytest_runtest_makereport  # noqa: F401 - a hook, found here

ROOT = Path(__file__).resolve().parents[2]
ADMIN_EMAIL = "admin@swarm.example.com"
ADMIN_PASSWORD = "swarm-admin-password"
REDIS_PASSWORD = "swarm-redis-password-0123456789"
DATA_LABELS = ("bazaar.postgres", "bazaar.redis")
# All of the suite's traffic comes from one address: the per-address limits
# are raised, as in the compose suite (they have tests of their own).
SETTINGS = {
    "RATE_LIMIT_ANONYMOUS": "987654",
    "RATE_LIMIT_USER": "1000000",
    "LOGIN_FAILURES_PER_CLIENT": "1000000",
    "MAX_CONNECTIONS_PER_CLIENT": "0",
}
# Settings that are secrets only when set: `make swarm-up` turns each into a
# Docker secret read through its *_FILE setting.
METRICS = ("prometheus", "swarm-metrics-password-0123456789")
IMPORT_KEY = "swarm-import-key-0123456789abcdef"
IMPORTER = ("importer", "swarm-importer-secret-0123456789")
OPTIONAL_SECRETS = {
    "METRICS_USER": METRICS[0],
    "METRICS_PASSWORD": METRICS[1],
    "CATALOG_API_KEY": IMPORT_KEY,
    "OAUTH_CLIENTS": json.dumps(
        {IMPORTER[0]: {"secret": IMPORTER[1], "scopes": ["catalog:import"]}}
    ),
}


@dataclass
class Swarm:
    stack: str
    base_url: str
    tag: str
    secrets: dict[str, str]

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def service(self, name: str) -> str:
        return f"{self.stack}_{name}"

    def services(self) -> list[str]:
        return docker(
            "service", "ls", "--filter", f"label=com.docker.stack.namespace={self.stack}",
            "--format", "{{.Name}}",
        ).split()  # fmt: skip

    def running_tasks(self, name: str) -> list[dict[str, str]]:
        """The service's tasks that run now, with their container ids."""
        output = docker(
            "service", "ps", "--filter", "desired-state=running", "--no-trunc",
            "--format", "{{json .}}", self.service(name),
        )  # fmt: skip
        tasks = [json.loads(line) for line in output.splitlines() if line.strip()]
        return [task for task in tasks if task["CurrentState"].startswith("Running")]

    def containers(self, name: str) -> list[str]:
        """Ids of the service's running containers (a chat replica's `node` is
        the first 12 characters: its host name)."""
        return docker(
            "ps", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={self.service(name)}",
            "--format", "{{.ID}}",
        ).split()  # fmt: skip

    def service_ls(self) -> str:
        return docker("service", "ls", "--filter", f"label=com.docker.stack.namespace={self.stack}")


def docker(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=timeout
    )
    return done.stdout


def checkout_id() -> str:
    return hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def node_labels() -> dict[str, str]:
    node = docker("info", "--format", "{{.Swarm.NodeID}}").strip()
    labels: dict[str, str] = json.loads(
        docker("node", "inspect", "--format", "{{json .Spec.Labels}}", node)
    )
    return labels or {}


def read_secret(container: str, path: str) -> str:
    return docker("exec", container, "cat", path)


@pytest.fixture(scope="session")
def swarm() -> Iterator[Swarm]:
    stack = f"bazaar-swarm-{uuid.uuid4().hex[:8]}"
    port = free_port()
    environment = {
        **os.environ,
        **SETTINGS,
        **OPTIONAL_SECRETS,
        "STACK": stack,
        "GATEWAY_PORT": str(port),
        # the compose suite builds the same images under the same tag
        "TAG": os.environ.get("TAG") or f"e2e-{checkout_id()}",
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "SWARM_WAIT_SECONDS": "420",
    }
    environment.pop("JWT_ISSUER", None)
    swarm_before = swarm_state()
    labels_before = node_labels() if swarm_before == "active" else {}
    deploy = subprocess.run(
        ["sh", "deploy/swarm/up.sh"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    print(deploy.stdout, deploy.stderr)  # noqa: T201 - the deploy's account: `docker service ls`
    try:
        assert deploy.returncode == 0, "the stack did not converge"
        base_url, tag = f"http://127.0.0.1:{port}", environment["TAG"]
        yield Swarm(stack, base_url, tag, deployed_secrets(Swarm(stack, base_url, tag, {})))
    finally:
        subprocess.run(
            ["sh", "deploy/swarm/down.sh"],
            cwd=ROOT,
            env={**environment, "SWARM_DESTROY": "1"},
            check=True,
            timeout=300,
        )
        if swarm_before == "active":
            added = [label for label in DATA_LABELS if label not in labels_before]
            node = docker("info", "--format", "{{.Swarm.NodeID}}").strip()
            for label in added:
                docker("node", "update", "--label-rm", label, node)


def deployed_secrets(swarm: Swarm) -> dict[str, str]:
    """Every secret's value, read where it is mounted (generated ones too)."""
    postgres = swarm.containers("postgres")[0]
    auth = swarm.containers("auth")[0]
    catalog = swarm.containers("catalog")[0]
    chat = swarm.containers("chat")[0]
    return {
        "postgres-superuser-password": read_secret(postgres, "/run/secrets/superuser-password"),
        "auth-database-password": read_secret(auth, "/run/secrets/database-password"),
        "catalog-database-password": read_secret(catalog, "/run/secrets/database-password"),
        "chat-database-password": read_secret(chat, "/run/secrets/database-password"),
        "redis-password": read_secret(auth, "/run/secrets/redis-password"),
        "admin-password": read_secret(auth, "/run/secrets/admin-password"),
        "signing-key": read_secret(auth, "/run/secrets/signing-key"),
    }


class RetryAfter(httpx.AsyncBaseTransport):
    """A client that does what every 503 asks (`docs/design.md`, Errors):
    retry after `Retry-After`, for at most `patience_seconds` in all. A
    stack just converged is ready before each task has, say, auth's signing
    keys (its JWKS fetches started while auth's name did not resolve yet):
    such a task answers 503 with `Retry-After` until its next fetch."""

    def __init__(self, *, patience_seconds: float = 30.0) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.patience_seconds = patience_seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self.patience_seconds
        while True:
            response = await self.inner.handle_async_request(request)
            retry_after = response.headers.get("retry-after", "")
            if (
                response.status_code != 503
                or not retry_after.isdigit()
                or time.monotonic() + int(retry_after) > deadline
            ):
                return response
            await response.aclose()
            await asyncio.sleep(int(retry_after))

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def client(swarm: Swarm) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=swarm.base_url, timeout=20, transport=RetryAfter()
    ) as http:
        yield http


LOGGED_SERVICES = ("gateway", "auth", "catalog", "chat")


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test on the stack shows its tasks and its services' last log
    lines (what the gateway's pools held, a task that restarted)."""
    yield
    if "swarm" not in request.fixturenames or not failed(request):
        return
    swarm: Swarm = request.getfixturevalue("swarm")
    services = [swarm.service(name) for name in LOGGED_SERVICES]
    shown = [swarm.service_ls()]
    shown.append(
        docker("service", "ps", "--no-trunc", "--format",
               "{{.Name}} {{.CurrentState}} {{.Error}}", *services)
    )  # fmt: skip
    for service in services:
        logs = subprocess.run(
            ["docker", "service", "logs", "--timestamps", "--tail", "40", service],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        shown.append(logs.stdout + logs.stderr)
    print("\n".join(shown))  # noqa: T201 - shown with the failure
