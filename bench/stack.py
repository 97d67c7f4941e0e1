"""The compose stack for the benchmarks that need all of it (scale, mix).

Load goes to containers at their own addresses on the stack's network, never
to the published port: Docker's userland proxy carries loopback traffic to a
published port in a process of its own, with its own open-file limit (it
dies near 10,000 connections here) and CPU the stack would otherwise have.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Stack:
    """The compose stack with a benchmark's override file, under a project
    name of its own; `down` removes it with its volumes."""

    def __init__(self, name: str, override: str) -> None:
        # BENCH_PROJECT_PREFIX and TAG keep benchmarks run side by side apart
        prefix = os.environ.get("BENCH_PROJECT_PREFIX") or "bazaar-bench"
        self.project = f"{prefix}-{name}-{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "GATEWAY_PORT": str(free_port()),
            "TAG": os.environ.get("TAG") or "bench",
            # the stack generates its secrets unless given them, as an
            # operator's .env would: the benchmark seeds the catalog's
            # database as the catalog's own role
            "CATALOG_DATABASE_PASSWORD": secrets.token_urlsafe(18),
        }
        self.files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / override)]

    def compose(self, *args: str, capture: bool = False) -> str:
        done = subprocess.run(
            ["docker", "compose", *self.files, *args],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=capture,
            text=True,
        )
        return done.stdout if capture else ""

    def up(self) -> None:
        # the build's progress goes to stderr: stdout is the benchmark's report
        subprocess.run(
            [
                "docker",
                "compose",
                *self.files,
                "up",
                "--detach",
                "--build",
                "--wait",
                "--quiet-pull",
            ],
            cwd=ROOT,
            env=self.env,
            check=True,
            stdout=sys.stderr,
        )

    def down(self) -> None:
        subprocess.run(
            ["docker", "compose", *self.files, "down", "--volumes", "--remove-orphans"],
            cwd=ROOT,
            env=self.env,
            check=False,
            capture_output=True,
        )

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "--quiet", service, capture=True).split()

    def catalog_database_url(self) -> str:
        """The catalog's database as its own role, at PostgreSQL's address."""
        postgres = self.address(self.containers("postgres")[0])
        password = self.env["CATALOG_DATABASE_PASSWORD"]
        return f"postgresql+asyncpg://catalog:{password}@{postgres}:5432/catalog"

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    @property
    def image(self) -> str:
        return f"bazaar/gateway:{self.env['TAG']}"

    def address(self, container: str) -> str:
        """The container's IP address on the stack's network (this host reaches it)."""
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", container],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        networks = json.loads(out)
        address: str = networks[self.network]["IPAddress"]
        return address
