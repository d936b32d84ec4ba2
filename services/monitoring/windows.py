"""Reading stored window statistics over any range of whole minutes.

A range is covered by the fewest stored windows: whole days where it can, then whole
hours, then minutes (at most 2 x 59 minutes + 2 x 23 hours + the days between), so a
month's report merges about 140 windows, not 43,200. Windows of several replicas merge
into one; merging is exact (see statistics.py), so the result equals the statistics of
all the range's rows.
"""

from __future__ import annotations

from collections import defaultdict

from modelplane.services.monitoring.statistics import WindowStats
from modelplane.services.monitoring.store import (
    DAY_US,
    HOUR_US,
    MINUTE_US,
    MonitoringStore,
    WindowKey,
)


def floor_minute(us: int) -> int:
    return us // MINUTE_US * MINUTE_US


def ceil_minute(us: int) -> int:
    return -(-us // MINUTE_US) * MINUTE_US


def tiles(start_us: int, end_us: int) -> list[tuple[int, int]]:
    """(granularity, window start) of the fewest whole windows covering [start, end),
    both whole minutes."""
    if start_us % MINUTE_US or end_us % MINUTE_US:
        raise ValueError("a range of whole minutes")
    covered = []
    at = start_us
    while at < end_us:
        for granularity in (DAY_US, HOUR_US, MINUTE_US):
            if at % granularity == 0 and at + granularity <= end_us:
                covered.append((granularity, at))
                at += granularity
                break
    return covered


def read_range(
    store: MonitoringStore,
    model: str,
    version: str,
    start_us: int,
    end_us: int,
    slice_key: str | None = "",
) -> list[tuple[WindowKey, bytes]]:
    """The stored windows (every replica's) that tile [start, end): one query per
    granularity, keeping only the windows of the tiling."""
    by_granularity: dict[int, set[int]] = defaultdict(set)
    for granularity, start in tiles(start_us, end_us):
        by_granularity[granularity].add(start)
    found: list[tuple[WindowKey, bytes]] = []
    for granularity, starts in by_granularity.items():
        rows = store.read_windows(
            model, version, granularity, min(starts), max(starts) + 1, slice_key
        )
        found.extend((key, data) for key, data in rows if key.start_us in starts)
    return found


def merged_by(
    rows: list[tuple[WindowKey, bytes]], group: str = "version"
) -> dict[tuple[str, ...], WindowStats]:
    """Windows merged per version ("version") or per version and slice ("slice")."""
    merged: dict[tuple[str, ...], WindowStats] = {}
    for key, data in rows:
        name = (
            (key.version,) if group == "version" else (key.version, key.slice_key, key.slice_value)
        )
        window = WindowStats.from_bytes(data)
        if name in merged:
            merged[name].merge(window)
        else:
            merged[name] = window
    return merged


def merged_range(
    store: MonitoringStore, model: str, version: str, start_us: int, end_us: int
) -> WindowStats:
    """One version's statistics of all rows in [start, end) ("" for the model-level
    counters: producers' drops and failures, rejected records)."""
    window = WindowStats()
    for key, data in read_range(store, model, version, start_us, end_us):
        if key.version == version:
            window.merge(WindowStats.from_bytes(data))
    return window
