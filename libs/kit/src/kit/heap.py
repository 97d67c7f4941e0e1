"""The garbage collector, tuned for a server whose heap is mostly start-up's.

Once an app has started, nearly everything on its heap (modules, routes,
pydantic schemas, SQL statements, pools) lives as long as the process. CPython's
cyclic collector still traverses all of it in every full collection, and a
server under load runs full collections often: the objects of requests in
flight, suspended on the database or an upstream, survive the young
collections and pile up in the old generation until it is collected whole.
Measured on the catalog (bench/catalog_bench.py, 32 connections): get-by-id
spent about 15% of its CPU there, with pauses of tens of milliseconds at p99.

So, once start-up is done:

- `gc.freeze()` moves every object alive into a permanent generation the
  collector never visits (after one collection, so start-up's own garbage
  goes first);
- the young generation's threshold goes from CPython's 700 allocations (2,000
  on 3.13) to 10,000, so a request's short-lived objects mostly die before
  they are ever collected, and far fewer reach the older generations.

Chat does not settle its heap: its processes mostly hold idle sockets, and
with the heap settled chat_bench measured 43-46 KiB of memory per idle socket
against 37 without, for no change in its fan-out latency.

Reference cycles are still collected; only their cost changes. Leaving the
block unfreezes and restores the threshold, so an app started and stopped in a
long-lived process (tests) leaves nothing frozen behind.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 10_000


@contextlib.contextmanager
def settled_heap(young_threshold: int = YOUNG_THRESHOLD) -> Iterator[None]:
    """Freezes the heap as start-up left it, for the life of the block."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
