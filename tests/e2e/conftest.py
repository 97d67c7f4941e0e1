"""The compose stack, started once per test run under its own project name and
on a free host port, so it never collides with a stack someone left running."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from testcontainers.compose import DockerCompose

from kit_testing import MailCatcher, free_port
from kit_testing.otlp_receiver import OtlpReceiver

from .failures import failed, pytest_runtest_makereport  # noqa: F401 - a hook, found here

ROOT = Path(__file__).resolve().parents[2]
ADMIN_EMAIL = "admin@e2e.example.com"
ADMIN_PASSWORD = "e2e-admin-password"
# the confidential clients compose.e2e.yaml configures
IMPORTER = ("e2e-importer", "e2e-importer-secret-0123456789")
RESOURCE_SERVER = ("e2e-reports", "e2e-reports-secret-0123456789")
IMPORT_KEY = "e2e-import-key"
# Set in the environment, as an operator's .env would: compose hands them on.
# All of the suite's traffic comes from one address (Docker's proxy), so the
# per-address limits are raised (they are tested in the gateway's and auth's
# own suites); per-account and per-user limits keep their defaults
# (test_abuse.py). Revocations are answered from the local mirror for 10 s
# (not 30) while Redis is down, so a 30 s outage shows both sides of that
# policy (test_degraded.py).
SETTINGS = {
    "RATE_LIMIT_ANONYMOUS": "987654",
    "RATE_LIMIT_USER": "1000000",
    "LOGIN_FAILURES_PER_CLIENT": "1000000",
    "MAX_CONNECTIONS_PER_CLIENT": "0",
    "CATALOG_API_KEY": IMPORT_KEY,
    "REVOCATION_MAX_STALENESS_SECONDS": "10",
}
HOST_FROM_CONTAINERS = "host.docker.internal"  # compose.e2e.yaml maps it to the host


@dataclass
class Stack:
    compose: DockerCompose
    project: str
    base_url: str
    mail: MailCatcher

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def compose_cmd(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.compose.compose_command_property, *args], check=True, capture_output=True
        )

    def restore(self) -> None:
        """Back to the suite's starting shape, every service healthy."""
        self.compose_cmd("up", "--detach", "--wait", "--no-recreate", "--no-build")

    def service_logs(self) -> list[str]:
        """Every line the four services have logged, oldest first per service."""
        return self.compose.get_logs("auth", "catalog", "chat", "gateway")[0].splitlines()

    def containers(self, service: str) -> list[dict[str, str]]:
        output = self.compose_cmd("ps", "--format", "json", service).stdout.decode()
        rows: list[dict[str, str]] = []
        for line in output.splitlines():
            parsed = json.loads(line) if line.strip() else []
            rows.extend(parsed if isinstance(parsed, list) else [parsed])
        return rows


def checkout_id() -> str:
    return hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """Where every service of the stack sends its traces: a receiver in this
    process, reached from the containers through the host's gateway address."""
    with OtlpReceiver(host="0.0.0.0") as receiver:
        yield receiver


@pytest.fixture(scope="session")
def stack(otlp_receiver: OtlpReceiver) -> Iterator[Stack]:
    port, smtp_port = free_port(), free_port()
    project = f"bazaar-e2e-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPOSE_PROJECT_NAME", project)
        patch.setenv("GATEWAY_PORT", str(port))
        # images tagged per checkout, so two checkouts testing at once never
        # run each other's builds
        patch.setenv("TAG", os.environ.get("TAG") or f"e2e-{checkout_id()}")
        patch.setenv("ADMIN_EMAIL", ADMIN_EMAIL)
        patch.setenv("ADMIN_PASSWORD", ADMIN_PASSWORD)
        # the address tests reach the gateway at: discovery's URLs and the issuer
        patch.setenv("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
        patch.delenv("JWT_ISSUER", raising=False)
        # auth mails a catcher on this machine (see compose.e2e.yaml)
        patch.setenv("SMTP_URL", f"smtp://host.docker.internal:{smtp_port}")
        for name, value in SETTINGS.items():
            patch.setenv(name, value)
        # tracing on, exported every 200 ms (tests/e2e/test_observability.py)
        patch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint_for(HOST_FROM_CONTAINERS)
        )
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        # every trace, not the default one in ten: the tests follow chat messages
        # and requests without a sampled traceparent
        patch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        compose = DockerCompose(
            ROOT,
            compose_file_name=["compose.yaml", "tests/e2e/compose.e2e.yaml"],
            build=True,
            wait=True,
        )
        try:
            compose.start()
        except Exception:
            logs = subprocess.run(
                [*compose.compose_command_property, "logs", "--no-color", "--tail", "60"],
                capture_output=True,
                check=False,
            )
            print(logs.stdout.decode(errors="replace"))  # noqa: T201 - shown when start-up fails
            compose.stop()
            raise
        mail = MailCatcher(host=host_gateway(compose), port=smtp_port)
        mail.start()
        try:
            yield Stack(compose, project, f"http://127.0.0.1:{port}", mail)
        finally:
            mail.stop()
            compose.stop()


def host_gateway(compose: DockerCompose) -> str:
    """This machine's address as the containers reach it: the catcher listens
    there only, not on every interface."""
    lookup = ["getent", "hosts", "host.docker.internal"]
    done = subprocess.run(
        [*compose.compose_command_property, "exec", "-T", "auth", *lookup],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.split()[0]


@pytest.fixture
def healthy_stack(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack, put back in shape after a test that broke part of it; the
    services' last log lines are shown when the test failed."""
    try:
        yield stack
    finally:
        if failed(request):
            print("\n".join(stack.service_logs()[-150:]))  # noqa: T201 - shown with the failure
        stack.restore()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as http:
        yield http
