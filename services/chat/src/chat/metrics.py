"""Prometheus metrics of the chat hub, served by kit's `/metrics`."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SENT_AT = '"sent_at":"'


def sent_at_of(frame: str) -> float | None:
    """The `sent_at` of a message frame, as a Unix time, without parsing the JSON.

    The key is searched from the end: inside a JSON string every quote is
    escaped, so `"sent_at":"` can only be the key itself.
    """
    start = frame.rfind(_SENT_AT)
    if start < 0:
        return None
    start += len(_SENT_AT)
    end = frame.find('"', start)
    try:
        return dt.datetime.fromisoformat(frame[start:end]).timestamp()
    except ValueError:
        return None


class QueueCollector(Collector):
    """Frames waiting in sockets' outboxes and publications waiting for Redis,
    read at scrape time."""

    def __init__(self) -> None:
        self.outbox_frames: Callable[[], Iterable[int]] = tuple
        self.backlog: Callable[[], int] = int

    def collect(self) -> Iterable[Metric]:
        depths = list(self.outbox_frames())
        yield GaugeMetricFamily(
            "chat_outbox_frames", "Frames queued to this replica's sockets", value=sum(depths)
        )
        yield GaugeMetricFamily(
            "chat_outbox_frames_max",
            "Frames queued to this replica's fullest socket",
            value=max(depths, default=0),
        )
        yield GaugeMetricFamily(
            "chat_bus_backlog",
            "Publications kept while Redis was unreachable, waiting to be sent",
            value=self.backlog(),
        )


class ChatMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.sockets = Gauge("chat_sockets", "Open chat sockets on this replica", registry=registry)
        self.rooms = Gauge(
            "chat_rooms", "Rooms with at least one socket on this replica", registry=registry
        )
        self.messages = Counter(
            "chat_messages_stored_total", "Messages stored by this replica", registry=registry
        )
        self.deliveries = Counter(
            "chat_deliveries_total",
            "Message frames given to sockets (written at once or queued)",
            registry=registry,
        )
        self.delivery_lag = Histogram(
            "chat_delivery_lag_seconds",
            "From a message's sent_at (taken before it is stored) to its frame being "
            "queued to this replica's sockets",
            buckets=LAG_BUCKETS,
            registry=registry,
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
        self.presence_frames = Counter(
            "chat_presence_frames_total",
            "Presence frames sent to rooms here (each to every socket of its room)",
            registry=registry,
        )
        self.presence_diffs = Counter(
            "chat_presence_diffs_total",
            "Presence diffs (this replica's and the others') those frames carried: "
            "more diffs than frames is diffs gathered into one frame",
            registry=registry,
        )
        self.queues = QueueCollector()
        registry.register(self.queues)

    def delivered(self, frame: str) -> None:
        """One message handed to this replica's sockets of its room."""
        sent_at = sent_at_of(frame)
        if sent_at is not None:
            self.delivery_lag.observe(max(0.0, time.time() - sent_at))

    def watch_queues(
        self, outbox_frames: Callable[[], Iterable[int]], backlog: Callable[[], int]
    ) -> None:
        self.queues.outbox_frames, self.queues.backlog = outbox_frames, backlog
