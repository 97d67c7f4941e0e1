"""The swarm's health check: healthy from a task's first ready answer, then
while its process answers. Swarm replaces an unhealthy task, so a check that
followed the dependencies would restart every replica in an outage.

The check (deploy/swarm/stack.yaml's `x-readiness`) runs here as Docker runs
it, against a stand-in replica whose answers the test sets."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

STACK_FILE = Path(__file__).resolve().parents[2] / "deploy" / "swarm" / "stack.yaml"
MARKER = "/tmp/.was-ready"


class Replica(ThreadingHTTPServer):
    statuses: dict[str, int]


class Answers(BaseHTTPRequestHandler):
    server: Replica
    protocol_version = "HTTP/1.1"  # as uvicorn answers

    def do_GET(self) -> None:
        status = self.server.statuses.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def replica() -> Iterator[Replica]:
    server = Replica(("127.0.0.1", 0), Answers)
    server.statuses = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def check_script(port: int, marker: Path) -> str:
    """The check's script as Docker runs it (after the stack's `$$` escapes),
    pointed at the stand-in and at a marker of the test's own."""
    stack = yaml.safe_load(STACK_FILE.read_text())
    command, shell, flag, script = (str(part) for part in stack["x-readiness"]["test"])
    assert (command, shell, flag) == ("CMD", "bash", "-c")
    assert script.count("127.0.0.1/8000") == 1
    assert script.count(MARKER) == 2
    return (
        script.replace("$$", "$")
        .replace("127.0.0.1/8000", f"127.0.0.1/{port}")
        .replace(MARKER, str(marker))
    )


def healthy(script: str) -> bool:
    return subprocess.run(["bash", "-c", script], timeout=10, check=False).returncode == 0


def test_a_task_is_healthy_once_ready_and_then_while_it_answers(
    replica: Replica, tmp_path: Path
) -> None:
    script = check_script(replica.server_address[1], tmp_path / "was-ready")

    # starting: alive, but its schema or database not there yet
    replica.statuses = {"/healthz": 200, "/readyz": 503}
    assert not healthy(script)
    replica.statuses = {"/healthz": 200, "/readyz": 200}
    assert healthy(script)
    # PostgreSQL away: unready, still healthy (the gateway's probes keep it
    # out of its pools, Swarm does not replace it)
    replica.statuses = {"/healthz": 200, "/readyz": 503}
    assert healthy(script)
    # the process stopped answering: unhealthy
    replica.statuses = {"/healthz": 500, "/readyz": 503}
    assert not healthy(script)


def test_a_task_that_never_answers_is_unhealthy(tmp_path: Path) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), Answers) as closed:
        port = closed.server_address[1]
    assert not healthy(check_script(port, tmp_path / "was-ready"))
