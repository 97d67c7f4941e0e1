"""A small OTLP/HTTP trace receiver, for tests and benchmarks.

It accepts `POST /v1/traces` (protobuf, optionally gzip-compressed), as
every service's exporter sends them, decodes the spans with
`opentelemetry-proto` and keeps them in memory; `GET /stats` answers the
counts as JSON. It runs in a thread of its own, so it keeps receiving
whatever the test's event loop is doing.

    with OtlpReceiver(host="0.0.0.0") as receiver:
        ...  # point OTEL_EXPORTER_OTLP_ENDPOINT at receiver.endpoint_for(host)
        spans = receiver.wait_for(lambda spans: ..., within=20)

`python -m kit_testing.otlp_receiver --port N` runs one on its own (the benchmark's).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPAN_KINDS = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    instance: str | None
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    start_ns: int
    end_ns: int
    error: bool
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    if kind is None:
        return None
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind)


def decode(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        service=str(resource.get("service.name", "")),
                        instance=resource.get("service.instance.id"),
                        attributes={item.key: _value(item.value) for item in span.attributes},
                        links=tuple(
                            (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                        ),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        error=span.status.code == 2,
                        resource=resource,
                    )
                )
    return spans


class OtlpReceiver:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, keep: bool = True, limit: int = 200_000
    ) -> None:
        """`keep=False` counts spans without keeping them (a benchmark); at most
        `limit` spans are kept, the oldest dropped first."""
        self.keep = keep
        self._spans: collections.deque[ReceivedSpan] = collections.deque(maxlen=limit)
        self._requests = 0
        self._span_count = 0
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def endpoint_for(self, host: str) -> str:
        """The OTEL_EXPORTER_OTLP_ENDPOINT to give a client that reaches us as `host`."""
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def stats(self) -> dict[str, int]:
        with self._changed:
            return {"requests": self._requests, "spans": self._span_count}

    def wait_for(
        self, found: Callable[[list[ReceivedSpan]], Sequence[ReceivedSpan]], within: float
    ) -> Sequence[ReceivedSpan]:
        """Waits until `found(spans)` is not empty; returns it, or raises TimeoutError."""
        deadline = time.monotonic() + within
        with self._changed:
            while True:
                result = found(list(self._spans))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching spans within {within} s")
                self._changed.wait(remaining)

    def _received(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._requests += 1
            self._span_count += len(spans)
            if self.keep:
                self._spans.extend(spans)
            self._changed.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/traces":
                    self._answer(404, b"", "text/plain")
                    return
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._received(decode(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self._answer(200, answer, "application/x-protobuf")

            def do_GET(self) -> None:
                self._answer(200, json.dumps(receiver.stats()).encode(), "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per export would drown the test's output

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="An OTLP/HTTP trace receiver that counts spans")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    receiver = OtlpReceiver(args.host, args.port, keep=False)
    receiver._server.serve_forever()


if __name__ == "__main__":
    main()
