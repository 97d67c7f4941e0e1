from __future__ import annotations

import asyncio
import fcntl
import io
import json
import logging
import os
import re
import select
import subprocess
import sys

from kit.context import request_id_var
from kit.logs import FLUSH_SECONDS, BatchedWriter, JsonFormatter, RequestIdFilter, TextFormatter

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


def tick_logger(stream: CountingStream, **options: float) -> logging.Logger:
    handler = BatchedWriter(stream, **options)
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


async def written(stream: CountingStream, count: int) -> None:
    """Waits (a second at most) for the stream's `count`th write."""
    for _ in range(100):
        if len(stream.writes) >= count:
            return
        await asyncio.sleep(FLUSH_SECONDS / 5)
    raise AssertionError(f"{len(stream.writes)} writes, not {count}")


async def test_lines_logged_on_the_loop_go_out_together_in_order() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    for number in range(3):
        log.info("line %d", number)
        await asyncio.sleep(0)  # other turns of the loop: still kept
    log.info("line 3")
    assert stream.writes == []
    await written(stream, 1)
    assert stream.writes == ["line 0\nline 1\nline 2\nline 3\n"]
    log.info("later")
    await written(stream, 2)
    assert stream.writes[1:] == ["later\n"]


async def test_with_no_flush_interval_a_turns_lines_go_out_at_its_end() -> None:
    stream = CountingStream()
    log = tick_logger(stream, flush_seconds=0)
    for number in range(3):
        log.info("line %d", number)
    assert stream.writes == []  # kept until the loop has run what it had ready
    await asyncio.sleep(0)
    assert stream.writes == ["line 0\nline 1\nline 2\n"]
    log.info("next turn")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["next turn\n"]


async def test_kept_lines_that_fill_an_atomic_write_go_out_without_waiting() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    line = "x" * 999
    for _ in range(5):
        log.info("%s", line)
    # the fifth line took the kept ones past PIPE_BUF: written, in writes a pipe takes whole
    assert stream.getvalue() == f"{line}\n" * 5
    assert all(len(write) <= select.PIPE_BUF for write in stream.writes)


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


async def test_kept_lines_go_out_in_writes_no_larger_than_a_pipe_writes_atomically() -> None:
    stream = CountingStream()
    log = tick_logger(stream)
    lines = [f"line {number} " + "x" * 290 + " \N{EM DASH}" for number in range(40)]
    lines.append("y" * 5000)  # longer than any atomic write: alone, and whole
    lines.append("last")
    for line in lines:
        log.info("%s", line)
    log.handlers[0].flush()
    assert stream.getvalue() == "".join(f"{line}\n" for line in lines)
    assert len(stream.writes) > 1
    assert "y" * 5000 + "\n" in stream.writes
    for write in stream.writes:
        assert write.endswith("\n")
        assert len(write.encode()) <= select.PIPE_BUF or write == "y" * 5000 + "\n"


# Two processes writing batched lines to one pipe, read slowly, as two gateway
# workers write to the container's output while its reader lags behind.
PIPE_WRITER = """
import asyncio, json, logging, sys
from kit.logs import BatchedWriter
handler = BatchedWriter(sys.stdout)
handler.setFormatter(logging.Formatter("%(message)s"))
log = logging.getLogger("writer")
log.handlers[:] = [handler]
log.propagate = False
log.setLevel(logging.INFO)
async def main():
    for turn in range(40):
        for number in range(100):
            log.info("%s", json.dumps({"writer": sys.argv[1], "turn": turn, "n": number, "pad": "x" * 200}))
        await asyncio.sleep(0)
asyncio.run(main())
"""


def test_processes_sharing_a_pipe_never_interleave_within_a_line() -> None:
    read_end, write_end = os.pipe()
    # a pipe of one page: a write larger than that waits for the reader midway,
    # and the other writer's lines can then land inside it
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, select.PIPE_BUF)
    writers = [
        subprocess.Popen([sys.executable, "-u", "-c", PIPE_WRITER, name], stdout=write_end)
        for name in ("a", "b")
    ]
    os.close(write_end)
    received = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as reader:
        while chunk := reader.read(512):
            received += chunk
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    entries = [json.loads(line) for line in received.decode().splitlines()]
    assert sorted((e["writer"], e["turn"], e["n"]) for e in entries) == sorted(
        (name, turn, number) for name in ("a", "b") for turn in range(40) for number in range(100)
    )
