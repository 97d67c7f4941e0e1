"""Prometheus metrics of the chat hub, served by kit's `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ChatMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sockets = Gauge("chat_sockets", "Open chat sockets on this replica", registry=registry)
        self.messages = Counter(
            "chat_messages_stored_total", "Messages stored by this replica", registry=registry
        )
        self.deliveries = Counter(
            "chat_deliveries_total", "Message frames queued to sockets", registry=registry
        )
        self.slow_consumers = Counter(
            "chat_slow_consumers_total", "Sockets closed for not keeping up", registry=registry
        )
        self.gap_fills = Counter(
            "chat_gap_fills_total",
            "Reads from PostgreSQL for ids the bus did not bring in time",
            registry=registry,
        )
        self.bus_connected = Gauge(
            "chat_bus_connected", "1 while the bus subscriber is connected", registry=registry
        )
        self.bus_reconnects = Gauge(
            "chat_bus_reconnects", "Times the bus subscriber came back", registry=registry
        )
