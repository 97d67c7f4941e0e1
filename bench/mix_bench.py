"""Capacity at a service level objective: a mixed workload through the gateway
and the same mix straight to the services, on the compose stack.

    uv run python bench/mix_bench.py --json /tmp/mix.json

The HTTP mix comes from wrk with a Lua script (bench/mix.lua): half the
connections browse the catalog (list pages of 20, searches, product pages of
10,000 seeded products), half are signed-in users (`/auth/users/me`, one
login in 200). Meanwhile 2,000 chat sockets sit in 100 rooms and one message
every two seconds goes into each room. wrk's load is closed-loop: each level is a
number of connections, and the rate a level reaches is what it measures. The
capacity of a path is the highest rate of a level whose p99 stays within
100 ms with no error (no non-2xx answer, no socket error, no chat message
lost). Through the gateway every request and socket goes to the gateway;
straight, each goes to its service's container (the chat sockets spread over
the replicas). Every address is a container's own on the stack's network,
never the published port (Docker's userland proxy). Levels alternate between
the two paths so that a machine growing busier favours neither.

Goal: the capacity through the gateway >= 0.8x the capacity straight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from stack import Stack

HERE = Path(__file__).resolve().parent
LEVELS = [int(n) for n in os.environ.get("MIX_LEVELS", "4,8,16,32,64").split(",")]
SECONDS = float(os.environ.get("MIX_SECONDS", "10"))
SOCKETS = 2000
ROOMS = 100
CHAT_PERIOD = 2.0  # seconds between two messages in one room
USERS = 20
PASSWORD = "mix-bench-password"
SLO_P99_MS = 100.0
_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


# -- chat side: 2,000 sockets, a message every CHAT_PERIOD in each room -------------------


async def chat_side(addresses: list[str], tokens: list[str]) -> None:
    """Opens the sockets, prints READY; then for each `GO <seconds>` line sends
    a message every CHAT_PERIOD seconds in every room and prints what arrived."""
    import aiohttp

    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    delivered = 0
    errors = 0

    async def reader(ws: aiohttp.ClientWebSocketResponse) -> None:
        nonlocal delivered, errors
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(frame.data)
            if data.get("type") == "message":
                delivered += 1
                sent = sent_at.get(data.get("client_id") or "")
                if sent is not None:
                    latencies.append(time.monotonic() - sent)
            elif data.get("type") == "error":
                errors += 1
        errors += 1  # a socket that closes during the benchmark

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        rooms = [f"mix-{uuid.uuid4().hex[:6]}-{n}" for n in range(ROOMS)]
        sockets: list[tuple[str, aiohttp.ClientWebSocketResponse]] = []
        limit = asyncio.Semaphore(32)

        async def open_one(index: int) -> None:
            room = rooms[index % ROOMS]
            url = f"ws://{addresses[index % len(addresses)]}/chat/ws/{room}"
            headers = {"Authorization": f"Bearer {tokens[index % len(tokens)]}"}
            async with limit:
                ws = await session.ws_connect(url, headers=headers, autoping=True)
                await ws.receive_json()
            sockets.append((room, ws))

        await asyncio.gather(*(open_one(n) for n in range(SOCKETS)))
        readers = [asyncio.create_task(reader(ws)) for _, ws in sockets]
        senders: dict[str, aiohttp.ClientWebSocketResponse] = {}
        for room, ws in sockets:
            senders.setdefault(room, ws)
        print("READY", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            seconds = float(line.split()[1])
            latencies.clear()
            delivered = errors = 0
            started = time.monotonic()
            ticks = int(seconds / CHAT_PERIOD)
            for tick in range(ticks):
                await asyncio.sleep(max(0.0, started + tick * CHAT_PERIOD - time.monotonic()))
                for ws in senders.values():
                    client_id = uuid.uuid4().hex
                    sent_at[client_id] = time.monotonic()
                    frame = {"type": "message", "text": "mix", "client_id": client_id}
                    await ws.send_str(json.dumps(frame))
            await asyncio.sleep(2.0)  # the tail
            expected = ticks * SOCKETS
            ordered = sorted(latencies)
            p99 = ordered[int(0.99 * (len(ordered) - 1))] * 1000 if ordered else float("nan")
            report = {"expected": expected, "delivered": delivered, "errors": errors}
            print(json.dumps({**report, "p99_ms": round(p99, 1)}), flush=True)
        for task in readers:
            task.cancel()


class ChatSide:
    def __init__(self, addresses: list[str], tokens: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--chat", json.dumps([addresses, tokens])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"chat sockets did not open: {line!r}")

    def start(self, seconds: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"GO {seconds}\n")
        self.process.stdin.flush()

    def result(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        figures: dict[str, Any] = json.loads(self.process.stdout.readline())
        return figures

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- HTTP side -----------------------------------------------------------------------


def wrk(env: dict[str, str], target: str, connections: int) -> dict[str, float]:
    command = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{round(SECONDS)}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "mix.lua"),
        f"http://{target}",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    latency = {p: float(v) * _UNITS[u] for p, v, u in _LATENCY.findall(out)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(rps.group(1)),
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "errors": float(non_2xx.group(1) if non_2xx else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
    }


async def accounts(base: str, count: int) -> list[tuple[str, str]]:
    """Registers `count` users; returns (email, access token) pairs."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=30) as http:

        async def one(number: int) -> tuple[str, str]:
            email = f"mix-{uuid.uuid4().hex[:10]}@example.com"
            body = {"email": email, "password": PASSWORD, "display_name": f"Mix {number}"}
            assert (await http.post("/auth/register", json=body)).status_code == 201
            form = {"username": email, "password": PASSWORD}
            response = await http.post("/auth/token", data=form)
            assert response.status_code == 200, response.text
            return email, str(response.json()["access_token"])

        return [await one(n) for n in range(count)]


def run() -> dict[str, Any]:
    from catalog_bench import seed

    stack = Stack("mix", "bench/compose.mix.yaml")
    results: dict[str, Any] = {"levels": LEVELS, "seconds": SECONDS, "runs": []}
    try:
        stack.up()
        address = {
            service: [f"{stack.address(c)}:8000" for c in stack.containers(service)]
            for service in ("gateway", "catalog", "auth", "chat")
        }
        ids = asyncio.run(seed(stack.catalog_database_url()))
        users = asyncio.run(accounts(f"http://{address['gateway'][0]}", USERS))
        tokens = [token for _, token in users]
        with tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False) as file:
            file.write("\n".join(ids) + "\n")
        base_env = {
            **os.environ,
            "TOKEN": tokens[0],
            "IDS_FILE": file.name,
            "LOGIN_EMAIL": users[0][0],
            "LOGIN_PASSWORD": PASSWORD,
        }
        paths = {
            "gateway": (
                {"CATALOG_ADDR": address["gateway"][0], "AUTH_ADDR": address["gateway"][0]},
                address["gateway"][0],
                address["gateway"],
            ),
            "direct": (
                {"CATALOG_ADDR": address["catalog"][0], "AUTH_ADDR": address["auth"][0]},
                address["catalog"][0],
                address["chat"],
            ),
        }
        for env, target, _ in paths.values():
            wrk({**base_env, **env}, target, 4)  # warm-up: connections, caches, plans
        sides = {name: ChatSide(chat, tokens) for name, (_, _, chat) in paths.items()}
        try:
            for level in LEVELS:
                for name, (env, target, _) in paths.items():
                    sides[name].start(SECONDS)
                    http = wrk({**base_env, **env}, target, level)
                    chat = sides[name].result()
                    lost = chat["expected"] - chat["delivered"]
                    row = {"path": name, "connections": level, **http, "chat": chat}
                    row["ok"] = (
                        http["p99_ms"] <= SLO_P99_MS
                        and http["errors"] == 0
                        and lost == 0
                        and chat["errors"] == 0
                    )
                    results["runs"].append(row)
                    print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            for side in sides.values():
                side.stop()
            Path(file.name).unlink(missing_ok=True)
    finally:
        stack.down()
    return results


def report(results: dict[str, Any]) -> list[str]:
    lines = [
        (
            f"mixed workload on the compose stack (3 chat replicas): wrk -t2 with bench/mix.lua"
            f" ({SECONDS:g} s a level; catalog lists, searches and pages; /users/me, 1 login in"
            f" 200) and {SOCKETS} chat sockets in {ROOMS} rooms, a message every"
            f" {CHAT_PERIOD:g} s in each"
        ),
        (
            f"{'path':<8} {'conns':>5} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
            f"{'chat lost':>9} {'chat p99':>9}  within SLO"
        ),
    ]
    for row in results["runs"]:
        chat = row["chat"]
        lines.append(
            f"{row['path']:<8} {row['connections']:>5} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f} {row['errors']:>6.0f} "
            f"{chat['expected'] - chat['delivered']:>9} {chat['p99_ms']:>7.1f}ms  "
            f"{'yes' if row['ok'] else 'no'}"
        )
    best: dict[str, float] = {}
    for name in ("gateway", "direct"):
        within = [row["rps"] for row in results["runs"] if row["path"] == name and row["ok"]]
        best[name] = max(within, default=0.0)
    ratio = best["gateway"] / best["direct"] if best["direct"] else 0.0
    results["capacity_rps"] = best
    results["ratio"] = round(ratio, 2)
    lines.append(
        f"capacity at p99 <= {SLO_P99_MS:g} ms and 0 errors: gateway {best['gateway']:.0f} rps,"
        f" straight to the services {best['direct']:.0f} rps"
    )
    met = ratio >= 0.8
    lines.append(
        f"[{'met' if met else 'MISSED'}] capacity through the gateway >= 0.8x straight: "
        f"{ratio:.2f}x"
    )
    results["goals"] = {"capacity ratio >= 0.8": met}
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chat", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chat:
        import uvloop

        addresses, tokens = json.loads(args.chat)
        uvloop.run(chat_side(addresses, tokens))
        return
    results = run()
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
