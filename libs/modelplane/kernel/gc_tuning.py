"""Garbage-collector settings for a serving process."""

from __future__ import annotations

import gc

# The serving processes' young-generation threshold (their `gc_threshold` default).
SERVING_THRESHOLD = 20_000


def tune_gc(threshold: int) -> None:
    """Freezes what startup built and makes young collections rare.

    Python runs a young-generation collection every 700 net allocations. At thousands of
    requests a second that cost more server CPU than a light model itself (inference:
    ~410 → ~220 µs/request at 64 concurrent clients, measured on the thread-per-request
    server), and now and then a full collection walked every object alive since startup:
    a ~50 ms stall inside whichever call triggered it (feature service, one bench run).
    Freezing moves startup objects (modules, stubs, models, definitions) out of every
    scan; the request paths make few reference cycles, so rarer collections hold little
    extra memory. Call it after building the server. `threshold` 0 keeps Python's
    defaults.
    """
    if threshold > 0:
        gc.collect()
        gc.freeze()
        gc.set_threshold(threshold, 20, 20)
