"""What every benchmark stands on: PostgreSQL and Redis containers reached at
their own addresses, processes pinned to a core, client processes that say
when they are ready, and the CPU time processes spent."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from testcontainers.core.container import DockerContainer

from kit_testing import postgres_container, redis_container
from kit_testing.running import held_sockets, port_sockets

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int | None:
    """User + system clock ticks of a process, from /proc/<pid>/stat; None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    found, pending = [], _children(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending += _children(child)
    return found


def cpu_seconds(pid: int, *, descendants: bool = False) -> float | None:
    """User + system CPU time of a process (with `descendants`, of every process
    under it as well: a server's workers), from /proc; None where there is none."""
    total = _ticks(pid)
    if total is None:
        return None
    for child in _descendants(pid) if descendants else []:
        total += _ticks(child) or 0  # a worker gone meanwhile took its time along
    return total / CLOCK_TICKS


def connections_per_worker(pid: int, port: int) -> list[int]:
    """How many of the connections accepted on `port` each worker under `pid`
    holds (a worker: a process with the listening socket), largest first: how
    evenly the workers share them."""
    listening, accepted = port_sockets(port)
    counts = []
    for process in _descendants(pid):
        held = held_sockets(process)
        if held & listening:
            counts.append(len(held & accepted))
    return sorted(counts, reverse=True)


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
