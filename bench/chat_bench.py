"""Chat fan-out: latency and throughput across replicas, memory per idle socket.

Starts PostgreSQL and Redis (Testcontainers), migrates, serves a JWKS, and runs
chat replicas as uvicorn subprocesses (httptools, uvloop, kit's WebSocket
protocol as the image runs it). One sender on replica A publishes at a fixed
rate (a schedule, so a slow server cannot slow the sender down and hide its
own latency); receivers sit on replica A (same
replica as the sender) and on replica B (cross-replica, through Redis). Each
message carries the server's `sent_at` (taken before the database write), and
each receiver records arrival minus `sent_at`.

    uv run python bench/chat_bench.py --json /tmp/chat.json

Reports, per rate step: deliveries/s, p50/p99 for same- and cross-replica
receivers, the cross/same p99 ratio, and deliveries per CPU-second spent by
the chat replicas (from /proc). Then the resident memory a replica gains per
idle socket. Goals: cross p99 <= 1.5x same p99; >= 10,000 deliveries per chat
CPU-second at p99 <= 50 ms; < 50 KiB per idle socket. Receivers, replicas,
PostgreSQL and Redis share the machine's cores, so read ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from infra import cpu_seconds, postgres_server, ready_process, redis_server

ROOT = Path(__file__).resolve().parents[1]
CHAT_DIR = ROOT / "services" / "chat"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

RECEIVERS_PER_REPLICA = 100
RATES = (25, 50, 100)  # messages/s; x 200 receivers = 5k, 10k, 20k deliveries/s
STEP_SECONDS = 4.0
REPEATS = 3
IDLE_SOCKETS = 1000
IDLE_ROOMS = 100
BIG_ROOM = 2000  # members, half on each of two replicas, all joining at once
BIG_ROOM_MESSAGES = 5
PRESENCE_INTERVAL = 1.0


# -- worker process: many receiving (or idle) sockets --------------------------


async def worker(url: str, token: str, count: int) -> None:
    """Opens `count` sockets, prints READY, records latencies until STOP on stdin."""
    import aiohttp

    latencies: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    presence_frames: list[int] = [0] * count
    ready = 0

    async def receive(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal ready
        async with session.ws_connect(
            url.replace("{n}", str(index % IDLE_ROOMS)),
            headers={"Authorization": f"Bearer {token}"},
            autoping=True,
            heartbeat=None,
        ) as ws:
            first = await ws.receive_json()
            assert first["type"] == "ready", first
            ready += 1
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    break
                arrived = time.time()
                data = json.loads(frame.data)
                if data["type"] == "presence":
                    presence_frames[index] += 1
                if data["type"] != "message":
                    continue
                step = data["text"].partition(":")[0]
                sent = datetime.fromisoformat(data["sent_at"]).timestamp()
                latencies.setdefault(step, []).append(round((arrived - sent) * 1000, 3))
                counts[step] = counts.get(step, 0) + 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(receive(session, index)) for index in range(count)]
        while ready < count:
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            await asyncio.sleep(0.05)
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        json.dumps({"latencies": latencies, "counts": counts, "presence_frames": presence_frames}),
        flush=True,
    )


class Workers:
    def __init__(self, url: str, token: str, count: int) -> None:
        self.process = ready_process(
            [sys.executable, __file__, "--worker", url, token, str(count)],
            failure="worker failed to connect",
        )

    def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("STOP\n")
        self.process.stdin.flush()
        result: dict[str, Any] = json.loads(self.process.stdout.read())
        self.process.wait(timeout=10)
        return result


# -- infrastructure --------------------------------------------------------------


@contextlib.contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[str]:
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()


class Replica:
    def __init__(self, name: str, env: dict[str, str]) -> None:
        from kit_testing import free_port

        self.name = name
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "chat.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                # the protocols the image runs
                "--ws",
                "kit.websocket:WebSocketProtocol",
                "--ws-ping-interval",
                "20",
                "--ws-ping-timeout",
                "20",
            ],
            env={**env, "NODE_ID": name},
            cwd=CHAT_DIR,
        )
        self.wait_ready()

    def wait_ready(self, within: float = 30.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + within
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"replica {self.name} did not become ready") from None
                time.sleep(0.1)

    def ws(self, room: str) -> str:
        return f"ws://127.0.0.1:{self.port}/chat/ws/{room}"

    def cpu_seconds(self) -> float:
        seconds = cpu_seconds(self.process.pid)
        if seconds is None:
            raise RuntimeError(f"replica {self.name} has exited")
        return seconds

    def rss_kib(self) -> int:
        pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1])
        return pages * PAGE_KIB

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- measurements ------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def send_at_rate(
    url: str, token: str, steps: list[tuple[str, int]], cpu: Callable[[], float]
) -> dict[str, tuple[int, float]]:
    """Sends `rate` messages/s for STEP_SECONDS per step, on a fixed schedule;
    returns per step the count sent and the CPU-seconds the replicas spent."""
    import aiohttp

    sent: dict[str, tuple[int, float]] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws,
    ):

        async def drain() -> None:
            async for _ in ws:
                pass

        draining = asyncio.create_task(drain())
        for step, rate in steps:
            total = int(rate * STEP_SECONDS)
            cpu_before = cpu()
            started = time.monotonic()
            for index in range(total):
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send_str(json.dumps({"type": "message", "text": f"{step}:{index}"}))
            await asyncio.sleep(1.0)  # let the tail arrive before the next step
            sent[step] = (total, cpu() - cpu_before)
        draining.cancel()
    return sent


def fan_out(same: Replica, cross: Replica, minter: Any) -> list[dict[str, Any]]:
    """Every rate REPEATS times, interleaved; each row is the median over its repeats."""
    room = "bench"
    steps = [(f"r{rate}x{rep}", rate) for rep in range(REPEATS) for rate in RATES]
    receivers_same = Workers(same.ws(room), minter.token(), RECEIVERS_PER_REPLICA)
    receivers_cross = Workers(cross.ws(room), minter.token(), RECEIVERS_PER_REPLICA)

    def cpu() -> float:
        return same.cpu_seconds() + cross.cpu_seconds()

    sent = asyncio.run(send_at_rate(same.ws(room), minter.token(), steps, cpu))
    same_result, cross_result = receivers_same.stop(), receivers_cross.stop()
    measured: dict[int, list[dict[str, Any]]] = {}
    for step, rate in steps:
        count, cpu_seconds = sent[step]
        same_lat = same_result["latencies"].get(step, [])
        cross_lat = cross_result["latencies"].get(step, [])
        same_p99, cross_p99 = percentile(same_lat, 0.99), percentile(cross_lat, 0.99)
        measured.setdefault(rate, []).append(
            {
                "delivered": len(same_lat) + len(cross_lat),
                "expected": 2 * count * RECEIVERS_PER_REPLICA,
                "same_p50_ms": percentile(same_lat, 0.50),
                "same_p99_ms": same_p99,
                "cross_p50_ms": percentile(cross_lat, 0.50),
                "cross_p99_ms": cross_p99,
                "cross_over_same_p99": cross_p99 / max(same_p99, 0.001),
                "chat_cpu_seconds": cpu_seconds,
            }
        )
    rows = []
    for rate, runs in measured.items():
        delivered = sum(run["delivered"] for run in runs)
        cpu_seconds = sum(run["chat_cpu_seconds"] for run in runs)
        row: dict[str, Any] = {
            "rate_msgs_per_s": rate,
            "receivers": 2 * RECEIVERS_PER_REPLICA,
            "repeats": len(runs),
            "deliveries_per_s": round(delivered / (STEP_SECONDS * len(runs))),
            "delivered": delivered,
            "expected": sum(run["expected"] for run in runs),
            "chat_cpu_seconds": round(cpu_seconds, 2),
            "deliveries_per_chat_cpu_second": round(delivered / max(cpu_seconds, 0.01)),
        }
        for key in ("same_p50_ms", "same_p99_ms", "cross_p50_ms", "cross_p99_ms"):
            row[key] = round(statistics.median(run[key] for run in runs), 2)
        row["cross_over_same_p99"] = round(
            statistics.median(run["cross_over_same_p99"] for run in runs), 2
        )
        row["runs"] = runs
        rows.append(row)
    return rows


def idle_memory(replica: Replica, minter: Any) -> dict[str, Any]:
    warm = Workers(replica.ws("warm{n}"), minter.token(), 20)  # first-use allocations
    warm.stop()
    time.sleep(1.0)
    before = replica.rss_kib()
    idle = Workers(replica.ws("idle{n}"), minter.token(), IDLE_SOCKETS)
    time.sleep(2.0)
    after = replica.rss_kib()
    idle.stop()
    return {
        "idle_sockets": IDLE_SOCKETS,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_idle_socket": round((after - before) / IDLE_SOCKETS, 1),
    }


def big_room(first: Replica, second: Replica, minter: Any) -> dict[str, Any]:
    """BIG_ROOM members join one room at once, half on each replica, while an
    observer counts the presence frames it gets; then messages reach them all."""
    room = "big"
    return asyncio.run(_big_room(first, second, minter, room))


async def _big_room(first: Replica, second: Replica, minter: Any, room: str) -> dict[str, Any]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            first.ws(room), headers={"Authorization": f"Bearer {minter.token()}"}
        ) as observer,
    ):
        await observer.receive_json()
        frames: list[float] = []
        joined = 0

        async def watch() -> None:
            nonlocal joined
            async for frame in observer:
                data = json.loads(frame.data)
                if data["type"] == "presence":
                    frames.append(time.monotonic())
                    # one replica's diff, or several gathered into one frame
                    for diff in data.get("diffs", [data]):
                        joined += sum(user["connections"] for user in diff["joins"])
                        joined -= sum(user["connections"] for user in diff["leaves"])

        watching = asyncio.create_task(watch())
        started = time.monotonic()
        halves = await asyncio.gather(
            asyncio.to_thread(Workers, first.ws(room), minter.token(), BIG_ROOM // 2),
            asyncio.to_thread(Workers, second.ws(room), minter.token(), BIG_ROOM // 2),
        )
        opened = time.monotonic() - started
        deadline = time.monotonic() + 60
        # the observer's own join is in the first diff too
        while joined < BIG_ROOM + 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        storm_seconds = max(frames[-1] - started, 0.001) if frames else 0.0
        for index in range(BIG_ROOM_MESSAGES):
            await observer.send_str(json.dumps({"type": "message", "text": f"big:{index}"}))
            await asyncio.sleep(1.0)
        await asyncio.sleep(1.0)
        results = [await asyncio.to_thread(half.stop) for half in halves]
        watching.cancel()
    latencies = [value for result in results for value in result["latencies"].get("big", [])]
    member_frames = [count for result in results for count in result["presence_frames"]]
    return {
        "members": BIG_ROOM,
        "opened_seconds": round(opened, 2),
        "observer_presence_frames": len(frames),
        "observer_saw_joins": joined,
        "storm_seconds": round(storm_seconds, 2),
        "observer_frames_per_second": round(len(frames) / max(storm_seconds, 1.0), 2),
        "max_member_presence_frames": max(member_frames, default=0),
        "max_member_frames_per_second": round(
            max(member_frames, default=0) / max(storm_seconds, 1.0), 2
        ),
        "messages": BIG_ROOM_MESSAGES,
        "delivered": len(latencies),
        "expected": BIG_ROOM_MESSAGES * BIG_ROOM,
        "p50_ms": round(percentile(latencies, 0.5), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
    }


def report(rows: list[dict[str, Any]], memory: dict[str, Any]) -> str:
    lines = [
        (
            "chat fan-out: 1 sender on replica A; 100 receivers on A (same), 100 on B (cross);"
            f" {STEP_SECONDS:.0f} s per step, medians of {REPEATS} interleaved repeats"
        ),
        (
            f"{'msg/s':>6} {'deliv/s':>8} {'lost':>5} {'same p50':>9} {'same p99':>9} "
            f"{'cross p50':>10} {'cross p99':>10} {'x/s p99':>8} {'deliv/CPU-s':>12}"
        ),
    ]
    for row in rows:
        lines.append(
            f"{row['rate_msgs_per_s']:>6} {row['deliveries_per_s']:>8} "
            f"{row['expected'] - row['delivered']:>5} "
            f"{row['same_p50_ms']:>7.1f}ms {row['same_p99_ms']:>7.1f}ms "
            f"{row['cross_p50_ms']:>8.1f}ms {row['cross_p99_ms']:>8.1f}ms "
            f"{row['cross_over_same_p99']:>7.2f}x {row['deliveries_per_chat_cpu_second']:>12}"
        )
    big = memory["big_room"]
    # two replicas each send a room at most one diff per interval
    frames_goal = 2 / PRESENCE_INTERVAL + 1
    lines += [
        (
            f"room of {big['members']}: all joined in {big['opened_seconds']} s (half on each of"
            f" 2 replicas); the observer got {big['observer_presence_frames']} presence frames"
            f" over {big['storm_seconds']} s ({big['observer_frames_per_second']}/s), the"
            f" busiest member {big['max_member_presence_frames']}"
            f" ({big['max_member_frames_per_second']}/s); {big['messages']} messages:"
            f" {big['delivered']}/{big['expected']} deliveries, p50 {big['p50_ms']} ms,"
            f" p99 {big['p99_ms']} ms"
        ),
        (
            f"[{'met' if big['max_member_frames_per_second'] <= frames_goal else 'MISSED'}]"
            f" a join storm of {big['members']} costs each member <= {frames_goal:g} presence"
            f" frames/s (one diff per replica per {PRESENCE_INTERVAL:g} s):"
            f" {big['max_member_frames_per_second']}/s"
        ),
        (
            f"[{'met' if big['p99_ms'] <= 500 and big['delivered'] == big['expected'] else 'MISSED'}]"
            f" a message reaches all {big['members']} with p99 <= 500 ms: {big['p99_ms']} ms,"
            f" {big['delivered']}/{big['expected']}"
        ),
    ]
    lines.append(
        f"idle sockets: {memory['idle_sockets']}, RSS {memory['rss_before_kib']} -> "
        f"{memory['rss_after_kib']} KiB = {memory['kib_per_idle_socket']} KiB per socket "
        "(goal < 50)"
    )
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    within_latency = [row for row in rows if max(row["same_p99_ms"], row["cross_p99_ms"]) <= 50]
    best = max(within_latency, key=lambda row: row["deliveries_per_s"], default=None)
    reference = next((row for row in rows if row["rate_msgs_per_s"] == 50), rows[0])
    return {
        "cross_over_same_p99_at_10k": reference["cross_over_same_p99"],
        "cross_over_same_p99_goal": 1.5,
        "best_deliveries_per_s_at_p99_le_50ms": best and best["deliveries_per_s"],
        "deliveries_per_chat_cpu_second_at_that_rate": best
        and best["deliveries_per_chat_cpu_second"],
        "deliveries_per_chat_cpu_second_goal": 10_000,
        "kib_per_idle_socket": memory["kib_per_idle_socket"],
        "kib_per_idle_socket_goal": 50,
        "no_loss": all(row["delivered"] == row["expected"] for row in rows),
        "big_room_member_presence_frames_per_second": memory["big_room"][
            "max_member_frames_per_second"
        ],
        "big_room_member_presence_frames_per_second_goal": 2 / PRESENCE_INTERVAL + 1,
        "big_room_p99_ms": memory["big_room"]["p99_ms"],
        "big_room_p99_ms_goal": 500,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--worker", nargs=3, metavar=("URL", "TOKEN", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        import uvloop

        url, token, count = args.worker
        uvloop.run(worker(url, token, int(count)))
        return

    from kit_testing import TokenMinter

    minter = TokenMinter()
    with (
        postgres_server() as server,
        redis_server() as redis_url,
        jwks_server(minter.jwks) as jwks_url,
    ):
        database_url = f"{server}/chat"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "JWKS_URL": jwks_url,
            "SEND_RATE_PER_SECOND": "100000",
            "SEND_BURST": "100000",
            # every socket of the benchmark belongs to one user
            "MAX_SOCKETS_PER_USER": "1000000",
            "LOG_LEVEL": "WARNING",
            "PRESENCE_INTERVAL_SECONDS": str(PRESENCE_INTERVAL),
        }
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=CHAT_DIR,
            env=env,
            check=True,
            capture_output=True,
        )
        replicas: list[Replica] = []
        try:
            replicas.append(Replica("chat-a", env))
            replicas.append(Replica("chat-b", env))
            rows = fan_out(replicas[0], replicas[1], minter)
            big = big_room(replicas[0], replicas[1], minter)
            replicas.append(Replica("chat-idle", env))
            memory = idle_memory(replicas[2], minter)
            memory["big_room"] = big
        finally:
            for replica in replicas:
                replica.stop()
    text = report(rows, memory)
    print(text)
    summary = goals(rows, memory)
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"steps": rows, "memory": memory, "goals": summary, "report": text}, indent=2
            )
        )


if __name__ == "__main__":
    main()
