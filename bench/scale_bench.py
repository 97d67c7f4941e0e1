"""Chat and the edge at scale, on the compose stack: thousands of sockets
through the gateway, held, broadcast to, and moved by a killed replica.

    uv run python bench/scale_bench.py --json /tmp/scale.json
    SCALE_SOCKETS=2000 SCALE_HOLD_SECONDS=30 uv run python bench/scale_bench.py

Starts the stack (compose.yaml + bench/compose.scale.yaml: three chat
replicas, per-address and per-user guards opened for a load from one
client), then runs bench/scale_client.py in a container of the gateway's
image on the stack's own network: connections to a published port would
cross Docker's userland proxy, a process with its own open-file limit that
dies near 10,000 connections and costs CPU the stack needs. The client opens
the sockets, holds them, broadcasts, and asks this script to kill the chat
replica holding the most; this script samples memory (docker stats) before
the sockets open and while they are held, and counts in the gateway's log
the replicas it ejected or marked unhealthy during the storm.

Goals (issue "Chat and the edge at real scale"): 10,000 sockets held with
pings on for 5 minutes with 0 drops, opened at >= 500/s with 0 refusals; one
message in each of 100 rooms reaches every socket with p99 <= 1 s; the killed
replica's sockets reconnect and resume with `since` within 15 s, nothing lost
or doubled; memory per socket <= 40 KiB at the gateway, <= 30 KiB at chat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stack import Stack

ROOT = Path(__file__).resolve().parents[1]
SOCKETS = int(os.environ.get("SCALE_SOCKETS", "10000"))
ROOMS = int(os.environ.get("SCALE_ROOMS", "100"))
USERS = int(os.environ.get("SCALE_USERS", "100"))
HOLD_SECONDS = float(os.environ.get("SCALE_HOLD_SECONDS", "300"))
CONCURRENCY = int(os.environ.get("SCALE_CONCURRENCY", "64"))
BROADCASTS = int(os.environ.get("SCALE_BROADCASTS", "1"))
SETTLE_SECONDS = 10.0
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1000, "MB": 1000**2}


def memory_bytes(containers: list[str]) -> int:
    """Memory in use (docker stats: without the page cache), summed."""
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", *containers],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0
    for line in out.splitlines():
        used = line.split("/")[0].strip()
        match = re.fullmatch(r"([\d.]+)\s*([A-Za-z]+)", used)
        if match:
            total += int(float(match.group(1)) * UNITS[match.group(2)])
    return total


def cpu_seconds(containers: list[str]) -> float | None:
    """CPU time the containers used so far (cgroup v1 or v2 accounting), summed."""
    total = 0.0
    for container in containers:
        v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{container}/cpuacct.usage")
        v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container}.scope/cpu.stat")
        if v1.exists():
            total += int(v1.read_text()) / 1e9
        elif v2.exists():
            usage = v2.read_text().split("\n")[0].split()[1]  # usage_usec
            total += int(usage) / 1e6
        else:
            return None
    return total


CpuTimes = dict[str, float | None]


def cpu_times(services: dict[str, list[str]]) -> CpuTimes:
    return {name: cpu_seconds(ids) for name, ids in services.items()}


def cpu_per(
    before: CpuTimes, services: dict[str, list[str]], *, count: int, unit: float, digits: int
) -> dict[str, float]:
    """CPU each service spent since `before`, per one of `count`, in `unit`s
    of a second (1e6: microseconds); a service without accounting is left out."""
    spent = cpu_times(services)
    return {
        name: round(unit * (now - then) / max(1, count), digits)
        for name, then in before.items()
        if then is not None and (now := spent[name]) is not None
    }


def full_ids(containers: list[str]) -> list[str]:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.Id}}", *containers],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def log_count(stack: Stack, service: str, pattern: str, since: str) -> int:
    out = subprocess.run(
        ["docker", "compose", *stack.files, "logs", "--no-color", "--since", since, service],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return len(re.findall(pattern, out))


METRICS_REQUEST = (
    "exec 3<>/dev/tcp/127.0.0.1/8000; "
    'printf "GET /metrics HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n" >&3; '
    "cat <&3"
)


def presence_counts(containers: list[str]) -> dict[str, int]:
    """The chat replicas' presence frames sent to rooms and the diffs they
    carried (`chat_presence_frames_total`, `chat_presence_diffs_total`), summed;
    read inside each container (bash alone, as its health check does)."""
    counts = {"frames": 0, "diffs": 0}
    for container in containers:
        out = subprocess.run(
            ["docker", "exec", container, "bash", "-c", METRICS_REQUEST],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            for name in counts:
                if line.startswith(f"chat_presence_{name}_total "):
                    counts[name] += int(float(line.split()[1]))
    return counts


def sample_memory(
    figures: dict[str, Any],
    before: dict[str, int],
    containers: dict[str, list[str]],
    sockets: int,
) -> None:
    """Memory per held socket, once the sockets have settled (docker stats)."""
    time.sleep(min(SETTLE_SECONDS, HOLD_SECONDS / 2))
    memory = {
        service: {
            "before_mib": round(before[service] / 2**20, 1),
            "held_mib": round(memory_bytes(ids) / 2**20, 1),
        }
        for service, ids in containers.items()
    }
    for numbers in memory.values():
        grown = (numbers["held_mib"] - numbers["before_mib"]) * 1024
        numbers["kib_per_socket"] = round(grown / max(1, sockets), 1)
    figures["memory"] = memory


def run(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack("scale", "bench/compose.scale.yaml")
    figures: dict[str, Any] = {
        "sockets": SOCKETS,
        "rooms": ROOMS,
        "users": USERS,
        "hold_seconds": HOLD_SECONDS,
        "handshakes_in_flight": CONCURRENCY,
    }
    try:
        stack.up()
        gateways, chats = stack.containers("gateway"), stack.containers("chat")
        figures["chat_replicas"] = len(chats)
        time.sleep(SETTLE_SECONDS)
        before = {"gateway": memory_bytes(gateways), "chat": memory_bytes(chats)}
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        cidfile = Path(f"/tmp/{stack.project}-client.cid")
        cidfile.unlink(missing_ok=True)
        services = {
            service: full_ids(stack.containers(service))
            for service in ("gateway", "chat", "auth", "redis", "postgres")
        }
        cpu_before: CpuTimes = {}
        sampler: threading.Thread | None = None
        client = subprocess.Popen(
            [
                "docker",
                "run",
                "-i",
                "--rm",
                "--cidfile",
                str(cidfile),
                "--network",
                stack.network,
                "--ulimit",
                "nofile=20000:20000",
                "-v",
                f"{ROOT / 'bench'}:/bench:ro",
                stack.image,
                "python",
                "/bench/scale_client.py",
                "--url",
                "http://gateway:8000",
                f"--sockets={SOCKETS}",
                f"--rooms={ROOMS}",
                f"--users={USERS}",
                f"--hold={HOLD_SECONDS}",
                f"--concurrency={CONCURRENCY}",
                f"--broadcasts={BROADCASTS}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None
        assert client.stdout is not None
        for line in client.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            kind = event.pop("event")
            print(f"  {kind}: {json.dumps(event)}", file=sys.stderr, flush=True)
            figures[kind] = event
            if kind == "registered":
                services["client"] = [cidfile.read_text().strip()]
                cpu_before = cpu_times(services)
            if kind == "held":
                cpu_before = cpu_times(services)
            if kind == "broadcast":
                figures["cpu_us_per_delivery"] = cpu_per(
                    cpu_before, services, count=event["delivered"], unit=1e6, digits=1
                )
            if kind == "opened":
                figures["cpu_ms_per_socket_opened"] = cpu_per(
                    cpu_before, services, count=event["held"], unit=1000, digits=2
                )
                figures["presence_sent"] = presence_counts(chats)
                # sampled aside: the events after this one (held, broadcast) must be
                # read as they come, or the CPU they start and end is mismeasured
                sampler = threading.Thread(
                    target=sample_memory,
                    args=(figures, before, {"gateway": gateways, "chat": chats}, event["held"]),
                )
                sampler.start()
            elif kind == "kill":
                if sampler is not None:
                    sampler.join()  # the memory of the replicas held, before one dies
                figures["unhealthy_or_ejected_before_kill"] = log_count(
                    stack, "gateway", r"ejected chat replica|chat replica \S+ is unhealthy", started
                )
                subprocess.run(["docker", "kill", event["node"]], check=True, capture_output=True)
                client.stdin.write(f"killed {time.time()}\n")
                client.stdin.flush()
            elif kind == "storm":
                break  # every figure is in; the client closes its sockets and exits
        if sampler is not None:
            sampler.join()
        try:
            client.wait(timeout=120)
        except subprocess.TimeoutExpired:
            subprocess.run(["docker", "kill", cidfile.read_text().strip()], check=False)
            client.wait(timeout=30)
        figures["client_exit"] = client.returncode
    finally:
        if os.environ.get("SCALE_KEEP_STACK"):
            print(f"stack kept: docker compose -p {stack.project} down -v", file=sys.stderr)
        else:
            stack.down()
    return figures


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def report(figures: dict[str, Any]) -> list[str]:
    lines = [
        (
            f"chat at scale through the gateway: {figures['sockets']} sockets asked, "
            f"{figures['rooms']} rooms, {figures['users']} users, "
            f"{figures.get('chat_replicas', '?')} chat replicas, "
            f"{figures['handshakes_in_flight']} handshakes in flight, "
            "client in a container on the stack's network"
        )
    ]
    opened = figures.get("opened")
    if not opened:
        return [*lines, "the client did not open the sockets: see the log above"]
    lines.append(
        f"opened: {opened['held']} held, {opened['refused']} refused {opened['refusals']}, "
        f"{opened['seconds']} s, {opened['per_second']} sockets/s, per replica {opened['nodes']}"
    )
    if "frames" in opened:
        lines.append(
            f"frames the sockets read while they opened (after `ready`): {opened['frames']}"
        )
    sent = figures.get("presence_sent")
    if sent and sent["frames"]:
        lines.append(
            f"presence frames chat sent to rooms while they opened: {sent['frames']}, "
            f"carrying {sent['diffs']} diffs ({sent['diffs'] / sent['frames']:.2f} a frame)"
        )
    held = figures.get("held", {})
    broadcast = figures.get("broadcast", {})
    storm = figures.get("storm", {})
    memory = figures.get("memory", {})
    cpu = figures.get("cpu_ms_per_socket_opened", {})
    if cpu:
        lines.append(
            "CPU per socket opened (ms, all processes of each): "
            + ", ".join(f"{name} {ms}" for name, ms in cpu.items())
            + f"; total {round(sum(cpu.values()), 2)} ms"
        )
    cpu = figures.get("cpu_us_per_delivery", {})
    if cpu:
        lines.append(
            "CPU per broadcast delivery (us, all processes of each): "
            + ", ".join(f"{name} {us}" for name, us in cpu.items())
            + f"; total {round(sum(cpu.values()), 1)} us"
        )
    lines.append(
        f"held {held.get('seconds')} s: {held.get('open')} open, {held.get('drops')} dropped"
    )
    lines.append(
        f"broadcast: {broadcast.get('messages')} messages, {broadcast.get('delivered')}/"
        f"{broadcast.get('expected')} deliveries, p50 {broadcast.get('p50_ms')} ms, "
        f"p99 {broadcast.get('p99_ms')} ms, max {broadcast.get('max_ms')} ms"
    )
    lines.append(
        f"killed replica: {storm.get('moved')} sockets moved, {storm.get('resumed')} resumed "
        f"(p50 {storm.get('p50_s')} s, p99 {storm.get('p99_s')} s, max {storm.get('max_s')} s; "
        f"drop seen p50 {storm.get('dropped_p50_s')} s, max {storm.get('dropped_max_s')} s), "
        f"lost {storm.get('lost')}, doubled {storm.get('doubled')}, caught up "
        f"{storm.get('caught_up')}, refusals {storm.get('refusals')}"
    )
    phases = storm.get("phases")
    if phases:
        # where a resume's time went: the jitter before the first attempt, then
        # each successful attempt's TCP connect, its 101, and its `ready`
        lines.append(
            "resume phases (p50/p99/max s): "
            + ", ".join(
                f"{name} {numbers['p50_s']}/{numbers['p99_s']}/{numbers['max_s']}"
                for name, numbers in phases.items()
            )
        )
    if storm.get("resumed_by_second"):
        lines.append(f"resumed in each second after the kill: {storm['resumed_by_second']}")
    if storm.get("frames"):
        lines.append(f"frames the sockets read from the kill on: {storm['frames']}")
    for service, numbers in memory.items():
        lines.append(
            f"memory {service}: {numbers['before_mib']} -> {numbers['held_mib']} MiB = "
            f"{numbers['kib_per_socket']} KiB per socket"
        )
    lines.append(
        "gateway: chat replicas ejected or marked unhealthy before the kill: "
        f"{figures.get('unhealthy_or_ejected_before_kill')}"
    )
    asked = figures["sockets"]
    goals = [
        (
            f"{asked} sockets held {figures['hold_seconds']:g} s with 0 drops",
            held.get("open") == asked and held.get("drops") == 0,
            f"{held.get('open')} open, {held.get('drops')} drops",
        ),
        (
            "opened at >= 500 sockets/s with 0 refusals",
            opened["per_second"] >= 500 and opened["refused"] == 0,
            f"{opened['per_second']}/s, {opened['refused']} refused",
        ),
        (
            "one message per room reaches every socket, p99 <= 1 s",
            # every round's message reaches every socket: sockets x rounds deliveries
            broadcast.get("delivered")
            == broadcast.get("expected")
            == asked * len(broadcast.get("rounds", [None]))
            and broadcast.get("p99_ms", 1e9) <= 1000,
            (
                f"{broadcast.get('delivered')}/{broadcast.get('expected')} "
                f"({len(broadcast.get('rounds', []))} rounds), p99 {broadcast.get('p99_ms')} ms"
            ),
        ),
        (
            "killed replica's sockets resume with since within 15 s, none lost or doubled",
            bool(storm.get("moved"))
            and storm.get("within_goal") == storm.get("moved")
            and storm.get("lost") == 0
            and storm.get("doubled") == 0
            and storm.get("caught_up") is True,
            (
                f"{storm.get('within_goal')}/{storm.get('moved')} within 15 s, max "
                f"{storm.get('max_s')} s, lost {storm.get('lost')}, doubled {storm.get('doubled')}"
            ),
        ),
        (
            "memory per socket at the gateway <= 40 KiB",
            memory.get("gateway", {}).get("kib_per_socket", 1e9) <= 40,
            f"{memory.get('gateway', {}).get('kib_per_socket')} KiB",
        ),
        (
            "memory per socket at chat <= 30 KiB",
            memory.get("chat", {}).get("kib_per_socket", 1e9) <= 30,
            f"{memory.get('chat', {}).get('kib_per_socket')} KiB",
        ),
        (
            "no chat replica ejected or marked unhealthy by the storm",
            figures.get("unhealthy_or_ejected_before_kill") == 0,
            f"{figures.get('unhealthy_or_ejected_before_kill')}",
        ),
    ]
    lines += [f"[{verdict(met)}] {goal}: {figure}" for goal, met, figure in goals]
    figures["goals"] = {goal: met for goal, met, _ in goals}
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = run(args)
    print("\n".join(report(figures)))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
