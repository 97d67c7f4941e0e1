"""Gateway overhead, side by side in one run on loopback.

A trivial upstream endpoint (raw ASGI, and FastAPI, on uvicorn with httptools
and uvloop) is loaded with wrk directly, through the gateway as its image runs
it (`python -m gateway`: one worker process per core, the edge protocol),
through the gateway with one worker (for the scaling), through nginx
(Debian package, a worker per core, keep-alive upstream) as the reference
proxy, and through `floor_relay.py`, a relay on the same loop and parser as
the gateway with nothing else in it (the floor of a relay in Python), at one
connection and at 32. Each proxy's CPU time per request (all its processes)
is reported beside its rps: the figure that does not depend on how the
scheduler shared the cores. Beside them, the cores the upstream got and the
cores the upstream, the proxy and wrk kept busy together: at 32 connections
the upstream sets the pace, and the ratio follows its share.

    uv run python bench/gateway_bench.py --json /tmp/gateway.json

Goals: the gateway adds <= 0.3 ms at p50 with one connection; at 32
connections it reaches >= 0.9x the direct rps of a FastAPI upstream (a real
service) and >= 0.3x that of the raw ASGI upstream, the physical-limit
anchor (it answers faster than any proxy written in Python can relay). All
processes share the machine's cores with wrk, so read ratios, not absolute
numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from infra import connections_per_worker, cpu_seconds

PATH = "/catalog/ping"
FLOOR_RELAY = Path(__file__).with_name("floor_relay.py")
PATHS = ("direct", "gateway", "gateway1", "nginx", "floor")
UPSTREAM_APPS = textwrap.dedent(
    '''
    from fastapi import FastAPI

    BODY = b'{"message":"Hello, World!"}'


    async def raw(scope, receive, send):
        """The physical-limit anchor: an ASGI app with nothing in it."""
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"27")],
            }
        )
        await send({"type": "http.response.body", "body": BODY})


    fastapi_app = FastAPI()


    @fastapi_app.get("/catalog/ping")
    async def ping() -> dict[str, str]:
        return {"message": "Hello, World!"}
    '''
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_answers(url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


@contextlib.contextmanager
def process(
    command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def uvicorn(app: str, port: int, *, factory: bool = False, app_dir: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += [
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if factory:
        # the gateway as its image runs it: it takes no X-Forwarded-* from clients
        command += ["--factory", "--no-proxy-headers"]
    if app_dir:
        command += ["--app-dir", app_dir]
    return command


def nginx_config(prefix: Path, port: int, upstream_port: int) -> Path:
    config = prefix / "nginx.conf"
    config.write_text(
        textwrap.dedent(
            f"""
            worker_processes auto;
            daemon off;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {prefix}/body;
                proxy_temp_path {prefix}/proxy;
                fastcgi_temp_path {prefix}/fastcgi;
                uwsgi_temp_path {prefix}/uwsgi;
                scgi_temp_path {prefix}/scgi;
                upstream service {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
                server {{
                    listen 127.0.0.1:{port};
                    location / {{
                        proxy_pass http://service;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_set_header Host $host;
                        proxy_set_header X-Forwarded-For $remote_addr;
                    }}
                }}
            }}
            """
        )
    )
    return config


_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(
    url: str, *, connections: int, seconds: float, midway: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """One wrk run; `midway` is called halfway through it and its answer kept."""
    duration = max(1, round(seconds))
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        seen = None
        if midway is not None:
            time.sleep(duration / 2)
            seen = midway()
        output, _ = child.communicate()
    elapsed = time.monotonic() - started
    # wrk is the one child reaped meanwhile: the servers run on until the end
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = sum(
        getattr(children_after, field) - getattr(children_before, field)
        for field in ("ru_utime", "ru_stime")
    )
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command, output)
    rps_match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps_match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    latency = {p: float(v) * _UNITS[u] for p, v, u in _LATENCY.findall(output)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests = re.search(r"(\d+) requests in", output)
    return {
        "rps": float(rps_match.group(1)),
        "requests": float(requests.group(1)) if requests else 0.0,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "seconds": elapsed,
        "wrk_cpu_seconds": wrk_cpu,
        **({} if seen is None else {"midway": seen}),
    }


def measure(
    targets: dict[str, tuple[str, int]],
    *,
    connections: int,
    seconds: float,
    rounds: int,
    workers: dict[str, int] | None = None,
    upstream: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds (direct, gateway, nginx, direct, ...); the median round
    wins. A target is its URL and the process whose CPU time (its own and its
    workers') it costs: the proxy's, the upstream's when it is loaded directly.
    With the `upstream` process, every round also keeps how many cores the
    upstream got and how many the upstream, the proxy and wrk kept busy
    together. For a target named in `workers` (with the port it listens on),
    how its workers share the connections is looked at halfway through each
    round, and every round is kept beside the median (`rounds`: that split and
    the rps ratio to the same round's direct run)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for url, _ in targets.values():
        wrk(url, connections=connections, seconds=1)  # warm-up: connections, caches
    for _ in range(rounds):
        for name, (url, pid) in targets.items():
            port = (workers or {}).get(name)
            midway = None if port is None else functools.partial(connections_per_worker, pid, port)
            before = cpu_seconds(pid, descendants=True)
            upstream_before = None if upstream is None else cpu_seconds(upstream)
            result = wrk(url, connections=connections, seconds=seconds, midway=midway)
            after = cpu_seconds(pid, descendants=True)
            upstream_after = None if upstream is None else cpu_seconds(upstream)
            if before is not None and after is not None and result["requests"]:
                result["cpu_us"] = (after - before) / result["requests"] * 1e6
            if upstream_before is not None and upstream_after is not None:
                upstream_cpu = upstream_after - upstream_before
                proxy_cpu = 0.0 if pid == upstream else (after or 0.0) - (before or 0.0)
                busy = upstream_cpu + proxy_cpu + result["wrk_cpu_seconds"]
                result["upstream_cores"] = upstream_cpu / result["seconds"]
                result["busy_cores"] = busy / result["seconds"]
            runs[name].append(result)
    medians = {
        name: dict(sorted(results, key=lambda r: r["rps"])[len(results) // 2])
        for name, results in runs.items()
    }
    for name in workers or {}:
        medians[name]["rounds"] = [
            {
                "split": run.get("midway"),
                "rps_ratio": round(run["rps"] / direct["rps"], 3),
                "upstream_cores": run.get("upstream_cores"),
                "busy_cores": run.get("busy_cores"),
            }
            for run, direct in zip(runs[name], runs["direct"], strict=True)
        ]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions; the median is reported"
    )
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install -y {tool}")

    results: dict[str, Any] = {"path": PATH, "seconds": args.seconds, "cases": []}
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "bench_upstream.py").write_text(UPSTREAM_APPS)
        for upstream_kind, app in (
            ("raw ASGI", "bench_upstream:raw"),
            ("FastAPI", "bench_upstream:fastapi_app"),
        ):
            upstream_port, nginx_port = free_port(), free_port()
            gateway_port, single_port, floor_port = free_port(), free_port(), free_port()
            prefix = Path(workdir) / f"nginx-{upstream_port}"
            prefix.mkdir()
            gateway_env = {
                "CATALOG_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
                "AUTH_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
                "CHAT_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
                "RATE_LIMIT_ENABLED": "false",
                "HEALTH_CHECK_INTERVAL_SECONDS": "0",
                "LOG_LEVEL": "WARNING",
                "UVICORN_HOST": "127.0.0.1",
                "UVICORN_ACCESS_LOG": "false",
                "UVICORN_LOG_LEVEL": "warning",
            }
            with (
                process(uvicorn(app, upstream_port, app_dir=workdir)) as upstream,
                process(
                    [sys.executable, "-m", "gateway"],
                    env={**gateway_env, "UVICORN_PORT": str(gateway_port)},
                    cwd=workdir,
                ) as gateway,
                process(
                    [sys.executable, "-m", "gateway"],
                    env={**gateway_env, "UVICORN_PORT": str(single_port), "WORKERS": "1"},
                    cwd=workdir,
                ) as single,
                process(
                    [sys.executable, str(FLOOR_RELAY), str(floor_port), str(upstream_port)]
                ) as floor,
                process(
                    [
                        "nginx",
                        "-e",
                        str(prefix / "error.log"),
                        "-p",
                        str(prefix),
                        "-c",
                        str(nginx_config(prefix, nginx_port, upstream_port)),
                    ]
                ) as nginx,
            ):
                targets = {
                    "direct": (f"http://127.0.0.1:{upstream_port}{PATH}", upstream.pid),
                    "gateway": (f"http://127.0.0.1:{gateway_port}{PATH}", gateway.pid),
                    "gateway1": (f"http://127.0.0.1:{single_port}{PATH}", single.pid),
                    "nginx": (f"http://127.0.0.1:{nginx_port}{PATH}", nginx.pid),
                    "floor": (f"http://127.0.0.1:{floor_port}{PATH}", floor.pid),
                }
                for url, _ in targets.values():
                    wait_until_answers(url)
                for connections in (1, 32):
                    figures = measure(
                        targets,
                        connections=connections,
                        seconds=args.seconds,
                        rounds=args.rounds,
                        workers={"gateway": gateway_port} if connections > 1 else None,
                        upstream=upstream.pid,
                    )
                    results["cases"].append(
                        {"upstream": upstream_kind, "connections": connections, **figures}
                    )
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict[str, Any]) -> None:
    print(
        f"GET {results['path']}, wrk -t1, {results['seconds']:g} s per run, loopback, shared cores"
    )
    print("gateway: one worker per core (as the image runs it); gateway1: one worker;")
    print("floor: a relay on uvloop and httptools with nothing else in it (floor_relay.py)")
    print("cpu us: the proxy's CPU time per request, all its processes (direct: the upstream's)")
    print(f"busy: cores the upstream, the proxy and wrk kept busy together (of {os.cpu_count()});")
    print("up: the cores the upstream got")
    header = (
        f"{'upstream':<9} {'c':>3} {'path':<8} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'rps/direct':>10} {'+p50 ms':>8} {'cpu us':>7} {'busy':>5} {'up':>5}"
    )
    print(header)
    print("-" * len(header))
    for case in results["cases"]:
        direct = case["direct"]
        for name in PATHS:
            row = case.get(name)
            if row is None:  # a run from before the path was measured
                continue
            ratio = row["rps"] / direct["rps"]
            added = row["p50_ms"] - direct["p50_ms"]
            row["rps_ratio"], row["added_p50_ms"] = round(ratio, 3), round(added, 3)
            cpu = row.get("cpu_us")
            print(
                f"{case['upstream']:<9} {case['connections']:>3} {name:<8} {row['rps']:>9.0f} "
                f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {ratio:>10.2f} {added:>+8.3f}"
                f" {'-' if cpu is None else f'{cpu:.0f}':>7}"
                f" {_cores(row.get('busy_cores')):>5} {_cores(row.get('upstream_cores')):>5}"
            )
    goals, notes = [], []
    for case in results["cases"]:
        gateway, nginx = case["gateway"], case["nginx"]
        single, direct = case["gateway1"], case["direct"]
        label = f"{case['upstream']}, c={case['connections']}"
        if case["connections"] == 1:
            # one connection measures latency; rps there is 1 / latency for every path
            added = gateway["added_p50_ms"]
            figure = f"{added:+.3f} ms (nginx {nginx['added_p50_ms']:+.3f} ms)"
            goals.append((f"{label}: gateway adds <= 0.3 ms at p50", added <= 0.3, figure))
        else:
            wanted = 0.9 if case["upstream"] == "FastAPI" else 0.3
            ratio = gateway["rps_ratio"]
            figure = (
                f"{ratio:.2f}x (one worker {single['rps_ratio']:.2f}x, "
                f"nginx {nginx['rps_ratio']:.2f}x{_floor(case)}){_cpu_note(case)}"
            )
            goals.append((f"{label}: gateway >= {wanted}x direct rps", ratio >= wanted, figure))
            if gateway.get("rounds"):
                spread = ", ".join(
                    f"{'/'.join(map(str, r['split'] or ['?']))} {r['rps_ratio']:.2f}x"
                    f" {_cores(r.get('upstream_cores'))}/{_cores(r.get('busy_cores'))}"
                    for r in gateway["rounds"]
                )
                notes.append(
                    f"{label}: each round's connections per worker, rps/direct, "
                    f"cores the upstream got/cores busy: {spread}"
                )
            if direct.get("upstream_cores") is not None:
                notes.append(f"{label}: {_pace(case)}")
    print()
    for goal, met, figure in goals:
        print(f"[{'met' if met else 'MISSED'}] {goal}: {figure}")
    for note in notes:
        print(note)
    results["goals"] = [{"goal": goal, "met": met, "figure": figure} for goal, met, figure in goals]


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pace(case: dict[str, Any]) -> str:
    """The upstream sets the pace at 32 connections: the cores it got through
    each proxy beside the cores it got alone with wrk, and how busy the machine was."""
    direct = case["direct"]
    parts = [
        f"{name} {_cores(case[name].get('upstream_cores'))} ({_cores(case[name].get('busy_cores'))}"
        " busy)"
        for name in PATHS[1:]
        if name in case
    ]
    return (
        f"the upstream got {_cores(direct.get('upstream_cores'))} cores loaded directly "
        f"({_cores(direct.get('busy_cores'))} busy), through {', '.join(parts)}"
    )


def _floor(case: dict[str, Any]) -> str:
    floor = case.get("floor")
    return "" if floor is None else f", floor relay {floor['rps_ratio']:.2f}x"


def _cpu_note(case: dict[str, Any]) -> str:
    """The CPU a request costs the gateway, the upstream and the floor relay:
    on shared cores the rps ratio follows from these."""
    names = {"gateway": "gateway", "direct": "upstream", "floor": "floor relay"}
    parts = [
        f"{label} {case[name]['cpu_us']:.0f}"
        for name, label in names.items()
        if name in case and case[name].get("cpu_us") is not None
    ]
    return f"; CPU a request (us): {', '.join(parts)}" if parts else ""


if __name__ == "__main__":
    main()
