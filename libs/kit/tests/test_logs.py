from __future__ import annotations

import asyncio
import io
import json
import logging
import re

from kit.context import request_id_var
from kit.logs import JsonFormatter, RequestIdFilter, TextFormatter, TickWriter

ISO_MILLIS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def record(message: str, **fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("access", logging.INFO, __file__, 1, message, (), None)
    if fields:
        entry.fields = fields
    RequestIdFilter().filter(entry)
    return entry


def test_json_lines_have_iso_timestamps_with_milliseconds_and_zone_and_merge_fields() -> None:
    token = request_id_var.set("req-1")
    try:
        line = json.loads(JsonFormatter("catalog").format(record("GET / 200", status=200)))
    finally:
        request_id_var.reset(token)
    assert ISO_MILLIS_UTC.match(line["ts"])
    assert line["service"] == "catalog"
    assert line["request_id"] == "req-1"
    assert line["status"] == 200
    assert line["msg"] == "GET / 200"
    assert line["trace_id"] is None


def test_text_lines_read_left_to_right_for_people() -> None:
    line = TextFormatter("catalog").format(record("GET / 200", status=200, user_id=None))
    stamp, level, service, logger, request_id, rest = line.split(maxsplit=5)
    assert ISO_MILLIS_UTC.match(stamp)
    assert (level, service, logger, request_id) == ("INFO", "catalog", "access", "[-]")
    assert rest == "GET / 200  status=200"


class CountingStream(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def tick_logger(stream: CountingStream) -> logging.Logger:
    handler = TickWriter(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"kit.test.tick.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def test_lines_logged_off_the_event_loop_are_written_at_once() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    log.info("first")
    log.info("second")
    assert stream.writes == ["first\n", "second\n"]


async def test_lines_of_one_turn_of_the_loop_go_out_in_one_write_in_order() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    for number in range(5):
        log.info("line %d", number)
    assert stream.writes == []  # kept until the loop has run what it had ready
    await asyncio.sleep(0)
    assert stream.writes == ["line 0\nline 1\nline 2\nline 3\nline 4\n"]
    log.info("later")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["later\n"]


async def test_a_line_logged_off_the_loop_writes_what_the_loop_kept_first() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    log.info("on the loop")
    await asyncio.to_thread(log.info, "from a thread")
    assert stream.getvalue() == "on the loop\nfrom a thread\n"


async def test_flush_writes_what_is_kept() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    log.info("kept")
    log.handlers[0].flush()
    assert stream.getvalue() == "kept\n"
