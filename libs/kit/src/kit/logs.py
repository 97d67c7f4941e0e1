"""Logging: one line per record, each carrying the request id of its request
and the trace id of its trace.

`LOG_FORMAT=json` (the default) writes one JSON object per line, for log
collectors; `LOG_FORMAT=text` writes aligned plain text, for people at a
terminal. Timestamps are ISO 8601 in UTC with milliseconds and the zone
(`2025-01-31T09:15:02.123+00:00`). A record may carry structured `fields`
(`extra={"fields": {...}}`, as the access log does): JSON lines merge them
in, text lines append them as `key=value`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Literal

from opentelemetry import trace

from kit.context import request_id_var

LogFormat = Literal["json", "text"]
_format: LogFormat = "json"


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


def configure_logging(
    *, service: str, level: str = "INFO", log_format: LogFormat | None = None
) -> None:
    """Root logging to stdout. `log_format` sticks for the process: a later
    call without it (a lifespan re-configuring) keeps the format chosen."""
    global _format
    if log_format is not None:
        _format = log_format
    handler = logging.StreamHandler(sys.stdout)
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
