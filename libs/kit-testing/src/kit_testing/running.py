"""What tests and benchmarks read of running processes: the TCP sockets on a
port, its listening sockets' queues and the sockets a process holds (from
/proc), and what a scrape of `/metrics` says of a counter and of the worker
that answered it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def _port_rows(port: int) -> Iterator[list[str]]:
    """The fields of each row of the kernel's TCP tables on a local port."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address "ADDR:PORT" in hex
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    yield fields


def port_sockets(port: int) -> tuple[set[str], set[str]]:
    """Socket inodes on a local TCP port: (listening, established)."""
    listening: set[str] = set()
    established: set[str] = set()
    for fields in _port_rows(port):
        # state 0A is LISTEN, 01 ESTABLISHED
        {"0A": listening, "01": established}.get(fields[3], set()).add(fields[9])
    return listening, established


def accept_queues(port: int) -> int:
    """Connections made to a local port and not yet accepted, in all its
    listening sockets' queues (a listening socket's rx_queue)."""
    return sum(int(fields[4].split(":")[1], 16) for fields in _port_rows(port) if fields[3] == "0A")


def held_sockets(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` holds open (none if it is gone)."""
    held: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    held.add(target[8:-1])
    return held


def count_and_worker(exposition: str, sample: str, labels: Mapping[str, str]) -> tuple[float, str]:
    """The value of `sample` with exactly `labels` in a scrape (0 if absent),
    and the worker that answered it: the `pid` its own process counters carry
    when workers share the counts (kit.metrics.AcrossWorkers), else ""."""
    value, worker = 0.0, ""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                value = found.value
            elif found.name == "process_cpu_seconds_total":
                worker = found.labels.get("pid", "")
    return value, worker
