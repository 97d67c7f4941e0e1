"""deploy/swarm/wait.sh, the end of `make swarm-up`: it reports a stack up only
once every replicated service has all its replicas and every job has run.
Read here against what `docker service ls` prints, through a stand-in `docker`
that renders the script's own `--format` template (tests/swarm runs the real
thing)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT = ROOT / "deploy" / "swarm" / "wait.sh"

# `docker service ls` of a stack, as Docker 20.10 to 27 print it
CONVERGED = [
    {"Name": "s_postgres", "Mode": "replicated", "Replicas": "1/1"},
    {"Name": "s_auth", "Mode": "replicated", "Replicas": "2/2"},
    {"Name": "s_gateway", "Mode": "replicated", "Replicas": "1/1 (max 1 per node)"},
    {"Name": "s_migrate-auth", "Mode": "replicated job", "Replicas": "0/1 (1/1 completed)"},
]

FAKE_DOCKER = textwrap.dedent(
    """\
    import json, re, sys
    args = sys.argv[1:]
    services = json.load(open({table!r}))
    if args[:2] == ["service", "ls"]:
        if "--format" in args:
            template = args[args.index("--format") + 1]
            for service in services:
                print(re.sub(r"{{{{\\.(\\w+)}}}}", lambda m: service[m.group(1)], template))
        elif "-q" in args:
            print("\\n".join(service["Name"] for service in services))
        else:
            print("NAME REPLICAS")
    """
)


def wait(tmp_path: Path, services: list[dict[str, str]]) -> subprocess.CompletedProcess[str]:
    """wait.sh with no time left: one look at the stack, then done or timed out."""
    table = tmp_path / "services.json"
    table.write_text(json.dumps(services))
    script = tmp_path / "fake_docker.py"
    script.write_text(FAKE_DOCKER.format(table=str(table)))
    docker = tmp_path / "docker"
    docker.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    environment = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["sh", str(WAIT), "s", "0"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_a_converged_stack_is_up(tmp_path: Path) -> None:
    done = wait(tmp_path, CONVERGED)
    assert done.returncode == 0, done.stderr


def test_waits_for_a_gateway_capped_per_node(tmp_path: Path) -> None:
    # "0/1 (max 1 per node)" is a gateway not healthy yet, not a finished job
    services = [
        {**service, "Replicas": "0/1 (max 1 per node)"}
        if service["Name"] == "s_gateway"
        else service
        for service in CONVERGED
    ]
    done = wait(tmp_path, services)
    assert done.returncode == 1
    assert done.stderr.splitlines()[1:2] == ["s_gateway"], done.stderr


def test_waits_for_replicas_and_for_jobs_still_running(tmp_path: Path) -> None:
    services = [
        {**service, "Replicas": "1/2"} if service["Name"] == "s_auth" else service
        for service in CONVERGED
    ] + [{"Name": "s_migrate-chat", "Mode": "replicated job", "Replicas": "1/1 (0/1 completed)"}]
    done = wait(tmp_path, services)
    assert done.returncode == 1
    assert done.stderr.splitlines()[1:3] == ["s_auth", "s_migrate-chat"], done.stderr
