"""Logging: one line per record, each carrying the request id of its request
and the trace id of its trace.

`LOG_FORMAT=json` (the default) writes one JSON object per line, for log
collectors; `LOG_FORMAT=text` writes aligned plain text, for people at a
terminal. Timestamps are ISO 8601 in UTC with milliseconds and the zone
(`2025-01-31T09:15:02.123+00:00`). A record may carry structured `fields`
(`extra={"fields": {...}}`, as the access log does): JSON lines merge them
in, text lines append them as `key=value`.

Lines logged on a running event loop are kept for at most
`LOG_FLUSH_SECONDS` (50 ms) and written together (`BatchedWriter`), at once
when they fill a pipe's atomic write: a server logs a line a request, and
one write of many lines costs what one line's own would, in the process and
in whatever reads its output (a container's log driver). No write is larger
than `PIPE_BUF` (4 KiB), the most a pipe takes whole, so processes sharing
one output (the gateway's workers) never split each other's lines. Lines
logged off the loop (start-up, other threads) are written at once, after
what was kept; so are the kept ones when logging shuts down at exit. A
process killed outright loses at most its last 50 ms of lines.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from select import PIPE_BUF
from typing import Any, Literal, TextIO

from opentelemetry import trace

from kit.context import request_id_var

LogFormat = Literal["json", "text"]
_format: LogFormat = "json"
_access_log = True


class RequestIdFilter(logging.Filter):
    """Adds the request id and, inside a trace, the trace and span ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = record.span_id = None
        return True


def timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": timestamp(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`ts LEVEL service logger [request id] message key=value ...`"""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{timestamp(record)} {record.levelname:<7} {self.service} {record.name} "
            f"[{getattr(record, 'request_id', '-')}] {record.getMessage()}"
        )
        fields = getattr(record, "fields", None) or {}
        extras = {"trace_id": getattr(record, "trace_id", None), **fields}
        pairs = " ".join(f"{key}={value}" for key, value in extras.items() if value is not None)
        if pairs:
            line = f"{line}  {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


# How long a line logged on the loop may wait for others to share its write.
FLUSH_SECONDS = 0.05
_flush_seconds = FLUSH_SECONDS


class BatchedWriter(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of the last `flush_seconds` at once.

    Images run Python unbuffered, so each line written is a system call of its
    own and a wake-up of whatever reads the container's output: at 800
    requests a second through the gateway, Docker's daemons spent twice the
    CPU on its lines written a turn of the loop at a time. On a running
    loop a record's line is kept, and one timer, set by the first line kept,
    writes every line kept so far: in order, in as few writes as keep each
    write whole (`atomic_chunks`), and sooner once they fill one. With
    `flush_seconds` 0 the timer is the end of the loop's turn. Off the loop,
    or from another thread, a record is written at once, after whatever was
    kept."""

    def __init__(self, stream: TextIO, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(stream)
        self.flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._size = 0
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record is reported, not raised
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line)
        if loop is None or self._size >= PIPE_BUF:
            self._write()
        elif self._scheduled_on is not loop:
            # one timer for what is kept (a loop closed with it pending is replaced)
            self._scheduled_on = loop
            if self.flush_seconds > 0:
                loop.call_later(self.flush_seconds, self._write_kept)
            else:
                loop.call_soon(self._write_kept)

    def _write_kept(self) -> None:
        self.acquire()
        try:
            self._scheduled_on = None
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                for chunk in atomic_chunks(lines):
                    self.stream.write(chunk)
                    self.stream.flush()
            except Exception:  # noqa: BLE001 - the output is gone; nothing to report it to
                self._lines, self._size = [], 0

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()


def atomic_chunks(lines: list[str]) -> Iterator[str]:
    """`lines` joined into writes of at most `PIPE_BUF` bytes each, a line
    longer than that alone.

    Processes that share an output (a gateway's workers, a container's
    stdout) write into one pipe. A write of up to `PIPE_BUF` bytes lands whole;
    a larger one that finds the pipe full waits for the reader midway, and
    another process's write can land inside it, splitting a line in two."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode())
        if chunk and size + length > PIPE_BUF:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


def configure_logging(
    *,
    service: str,
    level: str = "INFO",
    log_format: LogFormat | None = None,
    access_log: bool | None = None,
    flush_seconds: float | None = None,
) -> None:
    """Root logging to stdout. `log_format`, `access_log` and `flush_seconds`
    stick for the process: a later call without them (a lifespan
    re-configuring) keeps what was chosen. With `access_log` False the
    `access` logger writes nothing below WARNING, and kit's access log
    middleware then follows no request."""
    global _format, _access_log, _flush_seconds
    if log_format is not None:
        _format = log_format
    if access_log is not None:
        _access_log = access_log
    if flush_seconds is not None:
        _flush_seconds = flush_seconds
    handler = BatchedWriter(sys.stdout, flush_seconds=_flush_seconds)
    handler.addFilter(RequestIdFilter())
    formatter = TextFormatter(service) if _format == "text" else JsonFormatter(service)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kit's access log (kit.accesslog) replaces uvicorn's, which knows no route,
    # request id, trace or user
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("access").setLevel(logging.NOTSET if _access_log else logging.WARNING)
