"""Helpers of the security tests: commands inside the stack's containers, and
tokens checked by every service directly, not only at the gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

from .conftest import Stack

# Run inside a service container: asks the service itself (not the gateway)
# until it answers `want`, or the deadline passes; prints the last status.
_PROBE = r"""
import sys, time, urllib.error, urllib.request
method, url, token, want, within = sys.argv[1:6]
deadline = time.monotonic() + float(within)
while True:
    request = urllib.request.Request(
        url,
        method=method,
        data=b"{}" if method == "POST" else None,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    )
    try:
        status = urllib.request.urlopen(request, timeout=5).status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    if str(status) == want or time.monotonic() > deadline:
        print(status)
        break
    time.sleep(0.5)
"""

# An authenticated request each service answers itself: 401 when it refuses
# the token. Catalog has no authenticated read, so it gets an (invalid) write:
# a token it accepts is then refused for its role or its body, never with 401.
DIRECT_PROBES = {
    "auth": ("GET", "/auth/users/me"),
    "catalog": ("POST", "/catalog/categories"),
    "chat": ("GET", "/chat/rooms/lobby/messages"),
}


def docker(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *arguments], input=stdin, capture_output=True, text=True, check=False
    )


def compose(
    stack: Stack, *arguments: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*stack.compose.compose_command_property, *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def psql(stack: Stack, database: str, query: str) -> str:
    """A query as the superuser, over the server's local socket."""
    done = compose(
        stack,
        "exec",
        "-T",
        "postgres",
        "sh",
        "-c",
        'psql -U "$POSTGRES_USER" -d "$1" -v ON_ERROR_STOP=1 -Atc "$2"',
        "psql",
        database,
        query,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def service_statuses(stack: Stack, token: str, *, want: int, within: float) -> dict[str, int]:
    """Every replica of auth, catalog and chat, asked directly with `token`
    until it answers `want` (or `within` seconds pass): the last status of each."""

    async def probe(container: str, method: str, path: str) -> int:
        done = await asyncio.to_thread(
            docker,
            "exec",
            container,
            "python",
            "-c",
            _PROBE,
            method,
            f"http://127.0.0.1:8000{path}",
            token,
            str(want),
            str(within),
        )
        return int(done.stdout.strip() or 0)

    targets = [
        (f"{service}/{row['Name']}", row["ID"], *DIRECT_PROBES[service])
        for service in DIRECT_PROBES
        for row in stack.containers(service)
    ]
    statuses = await asyncio.gather(*(probe(cid, method, path) for _, cid, method, path in targets))
    return {name: status for (name, *_), status in zip(targets, statuses, strict=True)}


def inspect(container: str) -> dict[str, Any]:
    done = docker("inspect", container)
    assert done.returncode == 0, done.stderr
    inspected: dict[str, Any] = json.loads(done.stdout)[0]
    return inspected


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
