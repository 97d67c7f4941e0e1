"""`python -m gateway` (the image's command): worker processes, each a
complete gateway on a listening socket of its own, restarted when one dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kit_testing.running import accept_queues, count_and_worker, held_sockets, port_sockets

from .conftest import dead_url, running_upstream

DEADLINE = 60.0


def children(pid: int) -> list[int]:
    """Worker processes of the supervisor `pid` (not multiprocessing's helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
            if parent == pid and b"resource_tracker" not in command:
                found.append(int(entry.name))
    return sorted(found)


def established_sockets(pid: int, port: int) -> int:
    """Connections to `port` accepted by process `pid` and still open."""
    _, established = port_sockets(port)
    return len(held_sockets(pid) & established)


def open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-file limit listed")


@contextlib.contextmanager
def gateway_process(
    port: int, redis_url: str, catalog: str, **more: str
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        **more,
        "WORKERS": "2",
        "UVICORN_HOST": "127.0.0.1",
        "UVICORN_PORT": str(port),
        "REDIS_URL": redis_url,
        "CATALOG_UPSTREAM": catalog,
        "AUTH_UPSTREAM": dead_url(),
        "CHAT_UPSTREAM": dead_url(),
        "JWKS_URL": f"{dead_url()}/jwks.json",
        "HEALTH_CHECK_INTERVAL_SECONDS": "0",
        "RATE_LIMIT_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "gateway"], env=env)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_for(what: str, check: object) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        with contextlib.suppress(httpx.TransportError):
            if await check():  # type: ignore[operator]
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def keep_alive_clients(base_url: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []
    try:
        yield clients
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


async def workers_serving(base_url: str, supervisor: int) -> list[int]:
    """Waits for the gateway to answer with both its workers running; returns them."""
    async with httpx.AsyncClient(base_url=base_url) as http:

        async def serving() -> bool:
            ok = (await http.get("/catalog/echo")).status_code == 200
            return ok and len(children(supervisor)) == 2

        await wait_for("two workers serving", serving)
    return children(supervisor)


async def test_every_worker_serves_and_a_dead_one_is_replaced(redis_url: str) -> None:
    from kit_testing import free_port

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with running_upstream("one") as (upstream, upstream_url):
        with gateway_process(port, redis_url, upstream_url) as supervisor:
            workers = await workers_serving(base_url, supervisor.pid)
            # each worker raised its open-file limit to the hard limit
            for worker in workers:
                soft, hard = open_files_limit(worker)
                assert soft == hard, (worker, soft, hard)

            # new connections reach both workers
            async with keep_alive_clients(base_url) as clients:

                async def both_hold_connections() -> bool:
                    client = httpx.AsyncClient(base_url=base_url)
                    clients.append(client)
                    assert (await client.get("/catalog/echo")).status_code == 200
                    return all(established_sockets(pid, port) > 0 for pid in workers)

                await wait_for("connections on both workers", both_hold_connections)
                assert len(clients) < 200

            # a killed worker is replaced, and the gateway answered meanwhile
            # (a connection hashed to the dead worker's socket waits for its
            # replacement in the socket's queue)
            os.kill(workers[0], signal.SIGKILL)
            failures = 0
            deadline = time.monotonic() + DEADLINE
            while True:
                async with httpx.AsyncClient(base_url=base_url, timeout=DEADLINE) as fresh:
                    status = (await fresh.get("/catalog/echo")).status_code
                failures += status != 200
                now = children(supervisor.pid)
                if len(now) == 2 and workers[0] not in now:
                    break
                assert time.monotonic() < deadline, "the dead worker was not replaced"
                await asyncio.sleep(0.05)
            assert failures == 0

            (replacement,) = set(now) - set(workers)
            async with keep_alive_clients(base_url) as clients:

                async def replacement_serves() -> bool:
                    client = httpx.AsyncClient(base_url=base_url)
                    clients.append(client)
                    assert (await client.get("/catalog/echo")).status_code == 200
                    return established_sockets(replacement, port) > 0

                await wait_for("the replacement serving", replacement_serves)
    assert upstream.hits > 0


BURST = 64


async def test_connections_are_spread_over_the_workers_even_while_one_is_busy(
    redis_url: str,
) -> None:
    """Each worker has a listening socket of its own, and the kernel hashes
    each new connection to one of them. On one shared socket, connections
    that arrived while a worker was busy (stopped here) all went to the
    other, and keep-alive connections stay where they land."""
    from kit_testing import free_port

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with running_upstream("one") as (_, upstream_url):
        with gateway_process(port, redis_url, upstream_url) as supervisor:
            workers = await workers_serving(base_url, supervisor.pid)
            listening, _ = port_sockets(port)
            assert len(listening) == 2
            assert [len(held_sockets(pid) & listening) for pid in workers] == [1, 1]

            async with keep_alive_clients(base_url) as clients:
                clients.extend(
                    httpx.AsyncClient(base_url=base_url, timeout=DEADLINE) for _ in range(BURST)
                )
                os.kill(workers[0], signal.SIGSTOP)
                try:
                    answers = asyncio.gather(*(c.get("/catalog/echo") for c in clients))

                    async def all_connected() -> bool:
                        accepted = established_sockets(workers[1], port)
                        return accepted + accept_queues(port) == BURST

                    await wait_for("the burst's connections made", all_connected)
                finally:
                    os.kill(workers[0], signal.SIGCONT)
                assert [a.status_code for a in await answers] == [200] * BURST
                held = [established_sockets(pid, port) for pid in workers]
    assert sum(held) == BURST
    # 64 fair coin tosses give fewer than 16 on one side about once in 50,000
    assert min(held) >= BURST // 4, held


def sockets_of(supervisor: int, port: int) -> tuple[set[str], list[set[str]]]:
    """The port's listening sockets, and those each worker serves."""
    listening, _ = port_sockets(port)
    return listening, [held_sockets(pid) & listening for pid in children(supervisor)]


async def test_workers_added_taken_away_and_replaced_each_serve_a_socket_of_their_own(
    redis_url: str,
) -> None:
    """uvicorn's signals keep working: SIGTTIN adds a worker (and a socket),
    SIGTTOU takes one away (and its socket), SIGHUP replaces every worker,
    each new one serving its predecessor's socket; no answer is an error
    meanwhile."""
    from kit_testing import free_port

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    failures = 0

    async def served(http: httpx.AsyncClient) -> bool:
        nonlocal failures
        ok = (await http.get("/catalog/echo")).status_code == 200
        failures += not ok
        return ok

    def one_socket_each(supervisor: int, workers: int) -> bool:
        listening, served_by_each = sockets_of(supervisor, port)
        return (
            len(listening) == workers
            and len(served_by_each) == workers
            and all(len(socket) == 1 for socket in served_by_each)
            and set().union(*served_by_each) == listening
        )

    async with running_upstream("one") as (_, upstream_url):
        with gateway_process(port, redis_url, upstream_url) as supervisor:
            async with httpx.AsyncClient(base_url=base_url) as http:

                async def serving(workers: int) -> bool:
                    return await served(http) and one_socket_each(supervisor.pid, workers)

                await wait_for("two workers serving", lambda: serving(2))
                failures = 0
                os.kill(supervisor.pid, signal.SIGTTIN)
                await wait_for("a third worker", lambda: serving(3))
                os.kill(supervisor.pid, signal.SIGTTOU)
                await wait_for("back to two workers", lambda: serving(2))
                before = set(children(supervisor.pid))
                listening_before, _ = sockets_of(supervisor.pid, port)
                os.kill(supervisor.pid, signal.SIGHUP)

                async def replaced() -> bool:
                    now = set(children(supervisor.pid))
                    return await serving(2) and not now & before

                await wait_for("both workers replaced", replaced)
                assert sockets_of(supervisor.pid, port)[0] == listening_before
    assert failures == 0


def scraped(text: str) -> tuple[float, str]:
    """The count of proxied catalog GETs answered 200 a scrape reports, and
    the worker that answered it."""
    return count_and_worker(
        text, "http_requests_total", {"method": "GET", "route": "catalog", "status": "200"}
    )


async def test_a_scrape_reports_every_workers_requests_whichever_worker_answers(
    redis_url: str, tmp_path: Path
) -> None:
    """Each worker keeps its counts in the shared directory, emptied at start;
    any worker's scrape reports the sum, a dead worker's counts included."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from kit_testing import free_port

    directory = tmp_path / "metrics"
    directory.mkdir()
    # an earlier run's counts, left in the directory: not this run's
    earlier = MmapedDict(str(directory / "counter_1.db"))
    labels = ["route", "method", "status"], ["catalog", "GET", "200"]
    earlier.write_value(
        mmap_key("http_requests", "http_requests_total", *labels, "help"), 1000.0, 0.0
    )
    earlier.close()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    sent = 0

    async def get(client: httpx.AsyncClient) -> None:
        nonlocal sent
        assert (await client.get("/catalog/echo")).status_code == 200
        sent += 1

    async def every_worker_reports_all(workers: list[int]) -> None:
        """Scrapes on new connections until each worker has answered one with
        every request sent so far (a count lands just after its answer)."""
        reported: set[str] = set()

        async def all_reported() -> bool:
            async with httpx.AsyncClient(base_url=base_url) as fresh:
                count, answered_by = scraped((await fresh.get("/metrics")).text)
            assert count <= sent
            if count == sent:
                reported.add(answered_by)
            return reported == {str(pid) for pid in workers}

        await wait_for("every worker's scrape reporting every request", all_reported)

    async with running_upstream("one") as (_, upstream_url):
        with gateway_process(
            port, redis_url, upstream_url, PROMETHEUS_MULTIPROC_DIR=str(directory)
        ) as supervisor:
            async with keep_alive_clients(base_url) as clients:

                async def both_serve() -> bool:
                    client = httpx.AsyncClient(base_url=base_url)
                    clients.append(client)
                    await get(client)
                    workers = children(supervisor.pid)
                    return len(workers) == 2 and all(
                        established_sockets(pid, port) > 0 for pid in workers
                    )

                await wait_for("requests on both workers", both_serve)
                for client in clients:
                    await get(client)
            workers = children(supervisor.pid)
            await every_worker_reports_all(workers)

            # a killed worker's counts stay in the sum
            os.kill(workers[0], signal.SIGKILL)

            async def replaced() -> bool:
                now = children(supervisor.pid)
                return len(now) == 2 and workers[0] not in now

            await wait_for("the dead worker replaced", replaced)
            await every_worker_reports_all(children(supervisor.pid))
    assert sent >= 4


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_one_worker_per_core_is_capped_by_the_containers_cpu_quota(tmp_path: Path) -> None:
    from gateway.__main__ import usable_cores, worker_count

    cores = len(os.sched_getaffinity(0))
    v2_limited = cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})  # --cpus 1.5
    v2_unlimited = cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})
    v1_limited = cgroup(
        tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    v1_unlimited = cgroup(
        tmp_path / "v1max", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )

    assert usable_cores(v2_limited) == min(cores, 2)  # a part of a core is a worker
    assert usable_cores(v1_limited) == 1
    assert usable_cores(v2_unlimited) == cores
    assert usable_cores(v1_unlimited) == cores
    assert usable_cores(tmp_path / "none") == cores
    assert worker_count(3) == 3  # WORKERS set: taken as it is


def test_the_lean_websocket_protocol_and_no_deflate_unless_the_environment_says_otherwise() -> None:
    from gateway.__main__ import uvicorn_arguments
    from gateway.config import Settings

    settings = Settings(workers=1)

    def option(arguments: list[str], name: str) -> str | None:
        return arguments[arguments.index(name) + 1] if name in arguments else None

    defaults = uvicorn_arguments(settings, {})
    assert option(defaults, "--ws") == "kit.websocket:WebSocketProtocol"
    assert option(defaults, "--ws-per-message-deflate") == "false"
    # uvicorn reads UVICORN_<OPTION> itself: the defaults step aside
    chosen = uvicorn_arguments(
        settings, {"UVICORN_WS": "wsproto", "UVICORN_WS_PER_MESSAGE_DEFLATE": "true"}
    )
    assert "--ws" not in chosen
    assert "--ws-per-message-deflate" not in chosen


def test_the_supervisors_config_is_the_one_uvicorns_command_line_makes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With several workers the gateway's own supervisor runs them, on the
    options uvicorn would have taken: its arguments and `UVICORN_*`."""
    from gateway.__main__ import uvicorn_arguments, uvicorn_config
    from gateway.config import Settings

    monkeypatch.setenv("UVICORN_WS_MAX_SIZE", "65536")
    arguments = uvicorn_arguments(Settings(workers=3, listen_backlog=512), {})
    config = uvicorn_config([*arguments, "--header", "x-served-by:gateway"])
    assert (config.workers, config.backlog, config.host, config.port) == (3, 512, "0.0.0.0", 8000)
    assert config.ws == "kit.websocket:WebSocketProtocol"
    assert config.timeout_worker_healthcheck == 30
    assert config.ws_max_size == 65536
    assert [list(header) for header in config.headers] == [["x-served-by", "gateway"]]


def test_the_listening_socket_queues_a_reconnect_storm() -> None:
    """uvicorn's backlog of 2,048 overflowed when a killed chat replica's 3,334
    clients came back at once (their SYNs dropped, retried 1-3 s later)."""
    from gateway.__main__ import uvicorn_arguments
    from gateway.config import Settings

    def backlog(arguments: list[str]) -> int:
        return int(arguments[arguments.index("--backlog") + 1])

    assert backlog(uvicorn_arguments(Settings(workers=1), {})) == 4096
    assert backlog(uvicorn_arguments(Settings(workers=1, listen_backlog=8192), {})) == 8192


def test_the_workers_metrics_directory_is_fresh_and_goes_with_the_gateway(tmp_path: Path) -> None:
    from gateway.__main__ import shared_metrics

    environ: dict[str, str] = {}
    with shared_metrics(1, environ) as directory:
        assert directory is None  # one worker: its own registry
        assert environ == {}
    with shared_metrics(2, environ) as directory:
        assert directory is not None
        assert environ["PROMETHEUS_MULTIPROC_DIR"] == str(directory)
        (directory / "counter_1.db").write_bytes(b"")
    assert not directory.exists()
    assert environ == {}

    # the operator's directory: kept, emptied of an earlier run's counts
    chosen = tmp_path / "metrics"
    chosen.mkdir()
    (chosen / "counter_1.db").write_bytes(b"")
    (chosen / "notes.txt").write_text("not ours")
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(chosen)}
    with shared_metrics(1, environ) as directory:
        assert directory == chosen
        assert not (chosen / "counter_1.db").exists()
    assert (chosen / "notes.txt").exists()
    assert environ == {"PROMETHEUS_MULTIPROC_DIR": str(chosen)}
