from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chat.metrics import ChatMetrics, sent_at_of
from chat.schemas import StoredMessage
from kit_testing import TokenMinter

from .factories import Node, chat, unique_room


def message(text: str, sent_at: datetime) -> StoredMessage:
    return StoredMessage(
        room="r", id=1, user_id="u", display_name="U", text=text, client_id=None, sent_at=sent_at
    )


def test_sent_at_is_read_from_the_frame_even_when_the_text_imitates_it() -> None:
    sent_at = datetime(2025, 1, 31, 9, 15, 2, 123456, tzinfo=UTC)
    sneaky = message('"sent_at":"1999-01-01T00:00:00+00:00"', sent_at)
    assert sent_at_of(sneaky.frame()) == sent_at.timestamp()
    assert sent_at_of('{"type":"join"}') is None


def test_delivery_lag_is_observed_from_sent_at() -> None:
    metrics = ChatMetrics(CollectorRegistry())
    metrics.delivered(message("hi", datetime.now(UTC) - timedelta(seconds=2)).frame())
    (family,) = [
        family
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if family.name == "chat_delivery_lag_seconds"
    ]
    count = {sample.name: sample.value for sample in family.samples if not sample.labels}
    buckets = {s.labels["le"]: s.value for s in family.samples if "le" in s.labels}
    assert count["chat_delivery_lag_seconds_count"] == 1
    assert buckets["1.0"] == 0
    assert buckets["2.5"] == 1


async def test_metrics_show_sockets_rooms_queues_and_lag(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    node = cluster[2]
    async with chat(node, room, minter.token()) as sender:
        await sender.say("hello")
        await sender.messages(1)
        async with httpx.AsyncClient(base_url=node.url) as http:
            async with asyncio.timeout(10):
                while True:
                    scraped = {
                        sample.name: sample.value
                        for family in text_string_to_metric_families(
                            (await http.get("/metrics")).text
                        )
                        for sample in family.samples
                    }
                    if scraped["chat_delivery_lag_seconds_count"] >= 1:
                        break
                    await asyncio.sleep(0.02)
    assert scraped["chat_sockets"] >= 1
    assert scraped["chat_rooms"] >= 1
    assert scraped["chat_outbox_frames"] >= 0
    assert scraped["chat_bus_backlog"] == 0
    assert "db_pool_connections" in scraped
    assert "redis_pool_max_connections" in scraped
