"""Worker processes with a listening socket each (`SO_REUSEPORT`).

uvicorn's supervisor binds one socket that every worker accepts from. A new
connection wakes whichever worker is waiting in `epoll` at that moment, and
an event loop accepts everything queued when it wakes, so connections that
arrive while one worker is busy all go to the other; keep-alive connections
then stay where they landed. Measured on the mixed workload (`make bench
PARTS=mix`): a load tool's 40 connections, opened while the workers relayed
2,000 chat sockets, put 85% of the HTTP work on one of two workers, and the
gateway's p99 passed 100 ms at half the rate the services could take.

Here the supervisor binds one socket per worker on the same address, each
with `SO_REUSEPORT`, and the kernel picks a socket for each new connection
by a hash of its addresses and ports: the split is even on average whatever
each worker is doing (nginx's `reuseport`, Envoy's listeners and HAProxy's
shards work the same way). What that costs, and how it is kept small:

- A connection hashed to a busy worker waits for it, where a shared socket
  would have let the other take it. Each worker's loop is asynchronous and
  the gateway does nothing that blocks it, so the wait is a loop turn.
- The supervisor keeps every socket open, so a worker that dies leaves its
  socket's queue to its replacement: the connections hashed to it wait for
  the replacement to start (1.5-1.7 s here) instead of being refused.
- A worker taken away (`SIGTTOU`) closes its socket last: the connections
  still queued on it are reset, as they are when any server stops.

Everything else is uvicorn's: the workers, their health pings, the signals
(`SIGHUP` replaces every worker, `SIGTTIN`/`SIGTTOU` add or take one). A Unix
socket or an inherited descriptor (`UVICORN_UDS`, `UVICORN_FD`), or a system
without `SO_REUSEPORT`, gets uvicorn's one shared socket.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("uvicorn.error")


def reuse_port_supported(config: Config) -> bool:
    return hasattr(socket, "SO_REUSEPORT") and config.uds is None and config.fd is None


def listening_socket(config: Config) -> socket.socket:
    """One more socket on the configured address, in the group the kernel
    spreads new connections over; listening, as uvicorn's bound one is not
    until a worker serves it, so no connection is refused meanwhile."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as error:
        sock.close()
        logger.error(error)
        raise SystemExit(STARTUP_FAILURE) from error
    sock.listen(config.backlog)
    sock.set_inheritable(True)
    return sock


class Supervisor(Multiprocess):
    """uvicorn's supervisor, with `self.listening[i]` the socket of worker
    `self.processes[i]` and of every worker that replaces it."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, sockets=[])
        self.listening: list[socket.socket] = []

    def spawn(self, index: int) -> Process:
        process = Process(self.config, [self.listening[index]])
        process.start()
        return process

    def add_worker(self) -> None:
        self.listening.append(listening_socket(self.config))
        self.processes.append(self.spawn(len(self.listening) - 1))

    def init_processes(self) -> None:
        host, port = self.config.host, self.config.port
        for _ in range(self.processes_num):
            self.add_worker()
        logger.info(
            "Listening on %s:%d, a socket for each of %d workers", host, port, self.processes_num
        )

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: it goes
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # it failed before serving: the app or its settings are
                # broken, and every replacement would fail the same way
                logger.error("Worker [%s] failed to start; stopping.", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info("Worker [%s] died; its socket goes to a new one", process.pid)
            self.processes[index] = self.spawn(index)

    def restart_all(self) -> None:
        """Each worker in turn: its replacement serves first, on its socket."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self.spawn(index)
            ready = new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit)
            if not ready:
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error("Worker [%s] was not ready in time; restart stopped", new.pid)
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def handle_ttin(self) -> None:
        logger.info("Received SIGTTIN, adding a worker.")
        self.processes_num += 1
        self.add_worker()

    def handle_ttou(self) -> None:
        if self.processes_num <= 1:
            logger.info("Received SIGTTOU; one worker left, kept.")
            return
        logger.info("Received SIGTTOU, taking a worker away.")
        self.processes_num -= 1
        process = self.processes.pop()
        process.terminate()
        process.join()
        self.listening.pop().close()

    def run(self) -> None:
        try:
            super().run()
        finally:
            for sock in self.listening:
                sock.close()
