"""kit's OTLP exporter posts with `http.client` (`HTTPClientTransport`) and
keeps every setting the SDK's exporter honours: endpoint, headers,
compression, timeout, certificates, retries; and the SDK's `requests`
transport wherever `requests` would do more than post."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import ssl
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.http.transport._requests import RequestsHTTPTransport
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kit.otlp import HTTPClientTransport, LeanOTLPSpanExporter, SpanEncoder

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def exporters() -> Iterator[list[LeanOTLPSpanExporter]]:
    """Each test's exporters, shut down after it (their connection closed)."""
    made: list[LeanOTLPSpanExporter] = []
    yield made
    for exporter in made:
        exporter.shutdown()  # type: ignore[no-untyped-call]


def exporter_of(made: list[LeanOTLPSpanExporter], **kwargs: Any) -> LeanOTLPSpanExporter:
    exporter = LeanOTLPSpanExporter(**kwargs)
    made.append(exporter)
    return exporter


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Collector:
    """An OTLP endpoint that records each POST and answers with the statuses
    queued (200 once they run out); `drop` closes the connection after each
    answer without saying so, as an idle keep-alive connection is closed."""

    url: str
    posts: list[Posted] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    drop: bool = False


@pytest.fixture
def collector() -> Iterator[Collector]:
    yield from serve(None)


def serve(tls: ssl.SSLContext | None) -> Generator[Collector]:
    state: dict[str, Collector] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            me = state["collector"]
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            me.posts.append(Posted(self.path, headers, body, self.client_address[1]))
            status = me.statuses.pop(0) if me.statuses else 200
            self.send_response(status)
            if status != 200:
                self.send_header("retry-after", "0")
            self.send_header("content-length", "0")
            self.end_headers()
            if me.drop:
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    state["collector"] = Collector(f"{scheme}://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["collector"]
    finally:
        server.shutdown()
        server.server_close()


def finished_spans(count: int = 3) -> list[Any]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for number in range(count):
        with tracer.start_as_current_span(f"span {number}") as span:
            span.set_attribute("number", number)
    return list(exporter.get_finished_spans())


def test_batches_go_over_one_kept_alive_connection(
    collector: Collector, exporters: list[LeanOTLPSpanExporter]
) -> None:
    exporter = exporter_of(
        exporters, endpoint=collector.url + "/v1/traces", headers={"Authorization": "Bearer t"}
    )
    assert isinstance(exporter._client._transport, HTTPClientTransport)
    spans = finished_spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert exporter.export(spans[:1]) is SpanExportResult.SUCCESS
    first, second = collector.posts
    assert first.client_port == second.client_port
    assert first.path == "/v1/traces"
    assert first.headers["content-type"] == "application/x-protobuf"
    assert first.headers["authorization"] == "Bearer t"
    assert "content-encoding" not in first.headers
    assert first.body == SpanEncoder().encode(spans)
    sent = ExportTraceServiceRequest.FromString(second.body)
    assert [s.name for s in sent.resource_spans[0].scope_spans[0].spans] == ["span 0"]


def test_the_environments_endpoint_headers_and_gzip(
    collector: Collector, monkeypatch: pytest.MonkeyPatch, exporters: list[LeanOTLPSpanExporter]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=secret,tenant=a%20b")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    exporter = exporter_of(exporters)
    spans = finished_spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    (posted,) = collector.posts
    assert posted.path == "/v1/traces"
    assert posted.headers["api-key"] == "secret"
    assert posted.headers["tenant"] == "a b"
    assert posted.headers["content-encoding"] == "gzip"
    assert gzip.decompress(posted.body) == SpanEncoder().encode(spans)


def test_a_retryable_status_is_retried(
    collector: Collector, exporters: list[LeanOTLPSpanExporter]
) -> None:
    collector.statuses = [503, 429]
    exporter = exporter_of(exporters, endpoint=collector.url + "/v1/traces")
    assert exporter.export(finished_spans()) is SpanExportResult.SUCCESS
    assert len(collector.posts) == 3
    assert len({posted.body for posted in collector.posts}) == 1


def test_a_refused_batch_is_not_retried(
    collector: Collector, exporters: list[LeanOTLPSpanExporter]
) -> None:
    collector.statuses = [400]
    exporter = exporter_of(exporters, endpoint=collector.url + "/v1/traces")
    assert exporter.export(finished_spans()) is SpanExportResult.FAILURE
    assert len(collector.posts) == 1


def test_a_connection_the_collector_closed_is_opened_again(
    collector: Collector, exporters: list[LeanOTLPSpanExporter]
) -> None:
    collector.drop = True
    exporter = exporter_of(exporters, endpoint=collector.url + "/v1/traces")
    for _ in range(3):
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS
    assert len(collector.posts) == 3
    assert len({posted.client_port for posted in collector.posts}) == 3


def test_no_collector_fails_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch, exporters: list[LeanOTLPSpanExporter]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: refused
    exporter = exporter_of(exporters, endpoint=f"http://127.0.0.1:{port}/v1/traces")
    assert exporter._client._timeout == 0.5
    assert exporter.export(finished_spans(1)) is SpanExportResult.FAILURE


def test_certificates_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/collector/ca.pem")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/collector/client.pem")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/collector/client.key")
    transport = LeanOTLPSpanExporter(endpoint="https://collector:4318/v1/traces")._client._transport
    assert isinstance(transport, HTTPClientTransport)
    assert transport._verify == "/etc/collector/ca.pem"
    assert transport._cert == ("/etc/collector/client.pem", "/etc/collector/client.key")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CERTIFICATE")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/bundle.pem")
    transport = LeanOTLPSpanExporter(endpoint="https://collector:4318/v1/traces")._client._transport
    assert isinstance(transport, HTTPClientTransport)
    assert transport._verify == "/etc/ssl/bundle.pem"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTPS_PROXY", "http://proxy:3128"),
        ("https_proxy", "http://proxy:3128"),
        ("ALL_PROXY", "http://proxy:3128"),
        ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER", "vault"),
    ],
)
def test_requests_keeps_what_it_does_more_than_post(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    if "CREDENTIAL" in variable:
        # the SDK loads the provider's session itself; here, as if it had
        monkeypatch.setattr(
            "opentelemetry.exporter.otlp.proto.http.trace_exporter._load_session_from_envvar",
            lambda _: None,
        )
    exporter = LeanOTLPSpanExporter(endpoint="https://collector:4318/v1/traces")
    assert isinstance(exporter._client._transport, RequestsHTTPTransport)


def test_a_proxy_the_endpoint_bypasses_is_no_reason_for_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", "collector")
    exporter = LeanOTLPSpanExporter(endpoint="https://collector:4318/v1/traces")
    assert isinstance(exporter._client._transport, HTTPClientTransport)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = directory / "collector.pem", directory / "collector.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_file, key_file


def test_tls_verified_against_the_configured_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exporters: list[LeanOTLPSpanExporter]
) -> None:
    certificate, key = self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate, key)
    served = serve(tls)
    collector = next(served)
    try:
        # not trusted without the certificate: the batch fails, nothing is sent
        untrusting = exporter_of(exporters, endpoint=collector.url + "/v1/traces", timeout=0.5)
        assert untrusting.export(finished_spans(1)) is SpanExportResult.FAILURE
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(certificate))
        exporter = exporter_of(exporters, endpoint=collector.url + "/v1/traces")
        assert isinstance(exporter._client._transport, HTTPClientTransport)
        spans = finished_spans(2)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        first, second = collector.posts
        assert first.body == SpanEncoder().encode(spans)
        assert first.client_port == second.client_port
    finally:
        served.close()
