"""Traces, access logs and metrics of the running stack, and the observability
profile's files (Prometheus scrape configuration, Grafana dashboard).

The stack exports its traces to the suite's OTLP receiver (conftest.py). The
profile's own images (Prometheus, Jaeger, Grafana) cannot be run here: its
configuration is checked with promtool, and the dashboard against the series
the real services export.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import yaml
from websockets.asyncio.client import ClientConnection

from kit_testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from kit_testing.running import count_and_worker

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, Stack
from .helpers import bearer, login, open_socket, receive_json, receive_messages, register
from .observability import (
    DATASOURCES,
    PROMETHEUS_CONFIG,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    log_lines,
    metric_names,
    promtool,
    sample_names,
    scrape,
)

TRACE_DEADLINE_SECONDS = 30.0


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def spans_of(
    receiver: OtlpReceiver, found: Callable[[list[ReceivedSpan]], Sequence[ReceivedSpan]]
) -> Sequence[ReceivedSpan]:
    return await asyncio.to_thread(receiver.wait_for, found, TRACE_DEADLINE_SECONDS)


def one(spans: Sequence[ReceivedSpan], **wanted: Any) -> ReceivedSpan:
    matching = [
        span for span in spans if all(getattr(span, key) == value for key, value in wanted.items())
    ]
    assert len(matching) == 1, (wanted, [(s.service, s.name, s.kind) for s in spans])
    return matching[0]


async def access_lines(
    stack: Stack, request_id: str, services: Sequence[str], *, event: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each service's access log line for the request, once all are written."""
    deadline = time.monotonic() + TRACE_DEADLINE_SECONDS
    while True:
        lines = {
            line["service"]: line
            for line in await asyncio.to_thread(log_lines, stack, *services)
            if line.get("logger") == "access"
            and line.get("request_id") == request_id
            and (event is None or line.get("event") == event)
        }
        if set(lines) >= set(services) or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.2)


async def test_a_catalog_request_is_one_trace_from_the_gateway_to_the_database(
    stack: Stack, client: httpx.AsyncClient, otlp_receiver: OtlpReceiver
) -> None:
    admin = await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
    created = await client.post(
        "/catalog/products",
        json={"name": "Traced lamp", "price": "12.00"},
        headers=bearer(admin["access_token"]),
    )
    assert created.status_code == 201, created.text
    product_id = created.json()["id"]
    traceparent, trace_id, caller_span = new_traceparent()

    response = await client.get(
        f"/catalog/products/{product_id}",
        headers={"traceparent": traceparent, **bearer(admin["access_token"])},
    )
    assert response.status_code == 200

    def whole_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        mine = [span for span in spans if span.trace_id == trace_id]
        servers = {span.service for span in mine if span.kind == "SERVER"}
        return mine if servers >= {"gateway", "catalog"} else []

    spans = await spans_of(otlp_receiver, whole_trace)
    edge = one(spans, service="gateway", kind="SERVER")
    assert edge.name == "GET /catalog"
    assert edge.parent_span_id == caller_span  # the client's traceparent was continued
    assert edge.attributes["http.response.status_code"] == 200
    upstream = one(spans, service="gateway", kind="CLIENT", parent_span_id=edge.span_id, name="GET")
    catalog = one(spans, service="catalog", kind="SERVER")
    assert catalog.name == "GET /catalog/products/{product_id}"
    assert catalog.parent_span_id == upstream.span_id  # forwarded by the gateway
    sql = [span for span in spans if span.attributes.get("db.system") == "postgresql"]
    assert sql, "no SQL span"
    assert all(span.parent_span_id == catalog.span_id for span in sql)
    assert all(span.service == "catalog" for span in sql)

    lines = await access_lines(stack, response.headers["x-request-id"], ["gateway", "catalog"])
    assert lines["gateway"]["trace_id"] == lines["catalog"]["trace_id"] == trace_id
    assert lines["gateway"]["route"] == "/catalog"
    assert lines["catalog"]["route"] == "/catalog/products/{product_id}"
    for line in lines.values():
        assert line["status"] == 200
    # the edge verified the token; the catalog's read is public and never looks at it
    assert lines["gateway"]["user_id"]
    assert lines["catalog"]["user_id"] is None


async def test_the_gateway_starts_a_trace_when_the_client_sends_none(
    stack: Stack, client: httpx.AsyncClient, otlp_receiver: OtlpReceiver
) -> None:
    response = await client.get("/catalog/products", params={"limit": 1})
    assert response.status_code == 200
    lines = await access_lines(stack, response.headers["x-request-id"], ["gateway", "catalog"])
    trace_id = lines["gateway"]["trace_id"]
    assert trace_id
    assert lines["catalog"]["trace_id"] == trace_id

    def whole_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        mine = [span for span in spans if span.trace_id == trace_id]
        return (
            mine
            if {s.service for s in mine if s.kind == "SERVER"} >= {"gateway", "catalog"}
            else []
        )

    spans = await spans_of(otlp_receiver, whole_trace)
    assert one(spans, service="gateway", kind="SERVER").parent_span_id is None


async def test_a_chat_message_is_one_trace_from_sender_to_every_replica(
    stack: Stack, client: httpx.AsyncClient, otlp_receiver: OtlpReceiver
) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    room = f"traced-{uuid.uuid4().hex[:8]}"
    sender = await open_socket(stack.ws_url, room, token)
    receivers: list[ClientConnection] = []
    try:
        sender_node = (await receive_json(sender))["node"]
        # the gateway sends each new socket to the replica with the fewest open
        receiver_node = sender_node
        while receiver_node == sender_node:
            assert len(receivers) < 6, "every socket landed on the sender's replica"
            socket = await open_socket(stack.ws_url, room, token)
            receivers.append(socket)
            receiver_node = (await receive_json(socket))["node"]
        await sender.send(json.dumps({"type": "message", "text": "traced hello"}))
        (delivered,) = await receive_messages(receivers[-1], 1)
        assert delivered["text"] == "traced hello"
        handshake = receivers[-1].response
        assert handshake is not None
        session_request_id = handshake.headers["x-request-id"]
    finally:
        for socket in [sender, *receivers]:
            await socket.close()

    def message_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        roots = [
            span
            for span in spans
            if span.name == "chat message" and span.attributes.get("chat.room") == room
        ]
        if not roots:
            return []
        mine = [span for span in spans if span.trace_id == roots[0].trace_id]
        remote = [span for span in mine if span.kind == "CONSUMER"]
        return mine if any(span.instance == receiver_node for span in remote) else []

    spans = await spans_of(otlp_receiver, message_trace)
    message = one(spans, name="chat message")
    assert message.service == "chat"
    assert message.instance == sender_node
    assert message.parent_span_id is None  # a trace of its own ...
    assert message.attributes["messaging.message.id"] == str(delivered["id"])
    assert len(message.links) == 1  # ... linked to the sender's WebSocket session
    stored = [
        span
        for span in spans
        if span.attributes.get("db.system") == "postgresql" and span.name.startswith("INSERT")
    ]
    assert stored
    assert all(span.parent_span_id == message.span_id for span in stored)
    local = one(spans, name="chat deliver", kind="INTERNAL")
    assert local.parent_span_id == message.span_id
    assert local.instance == sender_node
    publish = one(spans, name="publish chat:room", kind="PRODUCER")
    assert publish.parent_span_id == message.span_id
    assert any(
        span.attributes.get("db.system") == "redis" and span.parent_span_id == publish.span_id
        for span in spans
    )
    remote = one(spans, name="chat deliver", kind="CONSUMER", instance=receiver_node)
    assert remote.parent_span_id == publish.span_id
    assert remote.attributes["chat.sockets"] >= 1
    assert {span.trace_id for span in spans} == {message.trace_id}

    # the session the message was sent on is a trace through the gateway and chat
    lines = await access_lines(stack, session_request_id, ["gateway", "chat"], event="open")
    assert lines["gateway"]["trace_id"] == lines["chat"]["trace_id"]
    assert lines["gateway"]["trace_id"]
    assert lines["chat"]["route"] == "/chat/ws/{room}"
    assert lines["chat"]["user_id"] == user["id"]


def test_the_scrape_configuration_passes_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_scrape_configuration_finds_every_replica_of_every_service_by_dns() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "bazaar"]
    (discovery,) = job["dns_sd_configs"]
    assert set(discovery["names"]) == {"gateway", "auth", "catalog", "chat"}
    assert discovery["type"] == "A"
    assert discovery["port"] == 8000


def test_the_profile_runs_the_official_images_unless_overridden() -> None:
    def images(**overrides: str) -> set[str]:
        env = {**os.environ, **overrides}
        for name in ("PROMETHEUS_IMAGE", "JAEGER_IMAGE", "GRAFANA_IMAGE"):
            if name not in overrides:
                env.pop(name, None)
        result = subprocess.run(
            ["docker", "compose", "--profile", "observability", "config", "--images"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return set(result.stdout.split())

    default = images()
    assert {name.split(":")[0] for name in default} >= {
        "prom/prometheus",
        "jaegertracing/all-in-one",
        "grafana/grafana",
    }
    mirrored = images(
        PROMETHEUS_IMAGE="mirror/prometheus:1",
        JAEGER_IMAGE="mirror/jaeger:1",
        GRAFANA_IMAGE="mirror/grafana:1",
    )
    assert {"mirror/prometheus:1", "mirror/jaeger:1", "mirror/grafana:1"} <= mirrored


def test_metric_names_are_read_from_promql() -> None:
    expression = (
        "histogram_quantile(0.99, sum by (service, le) "
        '(rate(http_request_duration_seconds_bucket{status=~"5.."}[$__rate_interval])))'
        " / on (service) group_left sum(up) or vector(0)"
    )
    assert metric_names(expression) == {"http_request_duration_seconds_bucket", "up"}


def test_the_dashboard_loads_and_uses_the_provisioned_prometheus() -> None:
    board = dashboard()
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus_uids = {source["uid"] for source in provisioned if source["type"] == "prometheus"}
    panels = [panel for panel in dashboard_panels(board) if panel["type"] != "row"]
    assert board["uid"] == "bazaar"
    assert len(panels) >= 16
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] in prometheus_uids
    expressions = dashboard_expressions(board)
    assert all(metric_names(expression) for expression in expressions)


async def test_every_series_the_dashboard_queries_is_exported_by_the_stack(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    # an upstream request per route first, so the gateway's per-route histograms exist
    assert (await client.get("/catalog/products", params={"limit": 1})).status_code == 200
    assert (await client.get("/auth/.well-known/jwks.json")).status_code == 200
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    response = await client.get("/chat/rooms/metrics-room/messages", headers=bearer(token))
    assert response.status_code == 200
    exported: set[str] = set()
    for service in ("gateway", "auth", "catalog", "chat"):
        exported |= sample_names(await asyncio.to_thread(scrape, stack, service))
    wanted = {
        name
        for expression in dashboard_expressions(dashboard())
        for name in metric_names(expression)
    }
    assert wanted - exported == set()


async def test_whichever_gateway_worker_answers_a_scrape_it_counts_every_workers_requests(
    stack: Stack,
) -> None:
    """The gateway runs a worker per core on one port; a scrape, like a
    request, reaches any of them."""

    async def scraped() -> tuple[float, str]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as fresh:
            return count_and_worker(
                (await fresh.get("/metrics")).text,
                "http_requests_total",
                {"route": "catalog", "method": "GET", "status": "200"},
            )

    before, _ = await scraped()
    sent = 40
    for _ in range(sent):  # each on a new connection: the workers share them
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as fresh:
            response = await fresh.get("/catalog/products", params={"limit": 1})
            assert response.status_code == 200
    workers = min(2, os.cpu_count() or 1)
    counted_all: set[str] = set()
    deadline = time.monotonic() + TRACE_DEADLINE_SECONDS
    while len(counted_all) < workers:
        count, worker = await scraped()
        if count >= before + sent:
            counted_all.add(worker)
        assert time.monotonic() < deadline, (counted_all, count, before + sent)
        await asyncio.sleep(0.1)
    assert "" not in counted_all
