"""`python -m gateway`, as the image runs it: uvicorn with the edge's protocol
and one worker process per core (`WORKERS`, 0 = one per usable core).

Each worker is a complete gateway: it imports the app, runs its own lifespan
(upstream session, health probes, DNS refresh, token verifier) and takes
connections from a listening socket of its own, which the supervisor binds
and keeps (`gateway.supervisor`: the kernel spreads new connections over the
workers' sockets, and a dead worker's goes to its replacement). What must be
shared between workers already lives in Redis (rate limits, revocations);
the per-address connection cap of `gateway.edge` is counted per worker.

The open-file limit is raised to its hard limit first: a relayed WebSocket
holds two descriptors (client and upstream), so the default soft limit of
1,024 would stop a worker near 500 sockets. Any other `uvicorn` option can be
given in the environment as `UVICORN_<OPTION>` (e.g. `UVICORN_WS_MAX_SIZE`).
Per-message deflate is off unless `UVICORN_WS_PER_MESSAGE_DEFLATE=true`:
every browser offers it, and it costs about 50 KiB of zlib state a socket.

With more than one worker, a scrape of `/metrics` reaches any of them, so each
keeps its counts in a directory they share (`PROMETHEUS_MULTIPROC_DIR`: the
operator's, emptied at start, or a new one under the temporary directory,
removed at the end) and the answering one reports every worker's
(`kit.metrics.AcrossWorkers`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

from uvicorn.config import LOGGING_CONFIG, Config
from uvicorn.main import main as uvicorn_main

from gateway.config import Settings
from gateway.supervisor import Supervisor, reuse_port_supported
from kit.metrics import WORKERS_DIRECTORY
from kit.process import raise_open_file_limit

CGROUP = Path("/sys/fs/cgroup")
WEBSOCKET_PROTOCOL = "kit.websocket:WebSocketProtocol"


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU time the container may use, in cores (`docker run --cpus`,
    compose's `cpus`, a Kubernetes CPU limit), None when unlimited or unknown."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is unlimited
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may run on, capped by the container's CPU quota:
    more workers than that only take turns on the same CPU time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def worker_count(configured: int) -> int:
    return configured if configured > 0 else usable_cores()


def uvicorn_arguments(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    # every interface of the container, port 8000, unless UVICORN_HOST/PORT say otherwise
    defaults = [] if "UVICORN_HOST" in environ else ["--host", "0.0.0.0"]
    defaults += [] if "UVICORN_PORT" in environ else ["--port", "8000"]
    # permessage-deflate costs ~50 KiB a socket (zlib's windows, websockets'
    # measure) for little on small JSON frames; UVICORN_WS_PER_MESSAGE_DEFLATE=true
    # turns it back on
    if "UVICORN_WS_PER_MESSAGE_DEFLATE" not in environ:
        defaults += ["--ws-per-message-deflate", "false"]
    # uvicorn's sans-I/O protocol, keeping less per socket (kit.websocket)
    if "UVICORN_WS" not in environ:
        defaults += ["--ws", WEBSOCKET_PROTOCOL]
    # uvicorn's own INFO lines are three per WebSocket (accepted, opened,
    # closed): a flood in a connection storm, and a tenth of the CPU of a
    # handshake. The gateway's own logs follow LOG_LEVEL.
    if "UVICORN_LOG_LEVEL" not in environ:
        defaults += ["--log-level", "warning"]
    return [
        "gateway.main:create_app",
        "--factory",
        *defaults,
        "--http",
        "gateway.edge:EdgeHttpProtocol",
        "--no-proxy-headers",
        "--timeout-graceful-shutdown",
        "10",
        "--workers",
        str(worker_count(settings.workers)),
        # uvicorn's 2,048 overflowed when a killed replica's 3,334 clients came
        # back at once: their SYNs were dropped and retried 1-3 s later
        "--backlog",
        str(settings.listen_backlog),
        # a worker busy with a storm still answers the supervisor from a thread;
        # give it room before it is taken for hung and restarted
        "--timeout-worker-healthcheck",
        "30",
    ]


@contextlib.contextmanager
def shared_metrics(
    workers: int, environ: MutableMapping[str, str] = os.environ
) -> Iterator[Path | None]:
    """The directory where the workers keep their counts, set in the
    environment they inherit: the operator's `PROMETHEUS_MULTIPROC_DIR`,
    emptied of an earlier run's counts, else, for more than one worker, a new
    one removed at the end. None: one worker, its own registry."""
    given = environ.get(WORKERS_DIRECTORY)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        yield directory
        return
    if workers <= 1:
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    environ[WORKERS_DIRECTORY] = str(directory)
    try:
        yield directory
    finally:
        environ.pop(WORKERS_DIRECTORY, None)
        shutil.rmtree(directory, ignore_errors=True)


def uvicorn_config(arguments: list[str]) -> Config:
    """The `Config` uvicorn's command line would make of `arguments` (and of
    the `UVICORN_*` environment), as its `main` turns them into `run`'s."""
    with uvicorn_main.make_context("uvicorn", list(arguments)) as context:
        options = dict(context.params)
    app_dir = options.pop("app_dir")
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    if options["log_config"] is None:
        options["log_config"] = LOGGING_CONFIG
    options["headers"] = [header.split(":", 1) for header in options["headers"]]
    for listed in ("reload_dirs", "reload_includes", "reload_excludes"):
        options[listed] = options[listed] or None
    return Config(**options)


def main() -> None:
    raise_open_file_limit()
    settings = Settings()
    arguments = uvicorn_arguments(settings)
    workers = worker_count(settings.workers)
    with shared_metrics(workers):
        if workers > 1:
            config = uvicorn_config(arguments)
            if reuse_port_supported(config) and not config.reload:
                Supervisor(config).run()
                return
        # one worker, or no SO_REUSEPORT: uvicorn as it comes
        uvicorn_main(args=arguments, prog_name="uvicorn")


if __name__ == "__main__":
    main()
