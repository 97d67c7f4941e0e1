from __future__ import annotations

import json
import logging
import re

from kit.context import request_id_var
from kit.logs import JsonFormatter, RequestIdFilter, TextFormatter

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
