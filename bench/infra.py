"""What every benchmark stands on: PostgreSQL and Redis containers reached at
their own addresses, processes pinned to a core, and client processes that
say when they are ready."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

from testcontainers.core.container import DockerContainer

from kit_testing import postgres_container, redis_container


def direct_address(container: DockerContainer, port: int, published: int) -> str:
    """`host:port` of the container itself when this host can reach it: a
    published port goes through docker-proxy, a userland copy that compose's
    network does not have (and that costs more CPU than a small query)."""
    wrapped = container.get_wrapped_container()
    wrapped.reload()
    networks = wrapped.attrs.get("NetworkSettings", {}).get("Networks", {}).values()
    for address in (network.get("IPAddress") for network in networks):
        if address:
            with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
                return f"{address}:{port}"
    return f"127.0.0.1:{published}"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server; yields `postgresql+asyncpg://user:password@host:port`."""
    with postgres_container("bench") as server:
        address = direct_address(server.container, 5432, server.port)
        yield f"postgresql+asyncpg://bench:bench@{address}"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway Redis server; yields its `redis://` URL."""
    with redis_container() as server:
        yield f"redis://{direct_address(server.container, 6379, server.port)}/0"


def pinned(command: list[str], core: int) -> list[str]:
    """The server on one core and the load on the other, when there are two."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *command]
    return command


def ready_process(command: list[str], *, failure: str) -> subprocess.Popen[str]:
    """A process spoken to over its stdin and stdout (a benchmark's client
    side), once it has written READY; any other first line is `failure`."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"{failure}: {line!r}")
    return process
