"""Materialization: the newest source row per entity in a time range → the online store.

Incremental by default: each view remembers the end of the last range it
materialized (its watermark) and the next run starts there. Rows are written
under the store's event-time rule, so re-running a range, or racing a push of
fresher values, never puts an older value back. The source is read in slices, so
its size is not bounded by memory; a run that fails part way leaves the watermark
where it was, and the next run rewrites the same rows (idempotently).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelplane.kernel.errors import FailedPrecondition, InvalidArgument
from modelplane.services.feature import codec, offline
from modelplane.services.feature.codec import Column
from modelplane.services.feature.definitions import DefinitionRegistry
from modelplane.services.feature.domain import Entity, FeatureView, ValueType, entity_keys
from modelplane.services.feature.online import now_us
from modelplane.services.feature.online_store import OnlineStore, WriteOutcome

# Rows per store write: bounds memory and the time one transaction holds the store.
WRITE_BATCH = 10_000


class WatermarkStore(Protocol):
    def watermark(self, view: str) -> int | None: ...

    def set_watermark(self, view: str, watermark_us: int) -> None: ...


@dataclass(frozen=True)
class Materialized:
    view: str
    start_us: int
    end_us: int
    rows_read: int
    rows_written: int
    rows_ignored: int


class Materializer:
    def __init__(
        self,
        registry: DefinitionRegistry,
        store: OnlineStore,
        watermarks: WatermarkStore,
        clock_us: Callable[[], int] = now_us,
        slice_rows: int = offline.SLICE_ROWS,
    ) -> None:
        self._registry = registry
        self._slice_rows = slice_rows
        self._store = store
        self._watermarks = watermarks
        self._clock_us = clock_us
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, view: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(view, threading.Lock())

    def run(
        self, views: Sequence[str], start_us: int | None = None, end_us: int | None = None
    ) -> list[Materialized]:
        catalog = self._registry.catalog
        if views:
            chosen = [catalog.view(name) for name in views]
        else:
            chosen = [v for v in catalog.views.values() if v.source is not None]
        for view in chosen:
            if view.source is None:
                raise FailedPrecondition(f"feature view {view.name!r} has no source")
        end = self._clock_us() if end_us is None else end_us
        if start_us is not None and start_us >= end:
            raise InvalidArgument("start_time must be before end_time")
        return [self._one(view, start_us, end) for view in chosen]

    def _one(self, view: FeatureView, start_us: int | None, end_us: int) -> Materialized:
        with self._lock(view.name):
            watermark = self._watermarks.watermark(view.name)
            start = start_us if start_us is not None else (watermark or 0)
            if start >= end_us:
                return Materialized(view.name, start, end_us, 0, 0, 0)
            entity = self._registry.catalog.entity(view.entity)
            read = written = ignored = 0
            # Slice by slice, so the source never has to fit in memory: the store keeps
            # the newest value per key (a tie goes to the later write, as a later file
            # row wins a tie within a slice), so the result is that of one pass.
            slices = offline.scan_source(
                view, entity, view.features, start, end_us, self._slice_rows
            )
            for source in slices:
                read += len(source.event_us)
                outcome = self._write_newest(view, entity, source)
                written += outcome.written
                ignored += outcome.ignored
            if watermark is None or end_us > watermark:
                self._watermarks.set_watermark(view.name, end_us)
            return Materialized(view.name, start, end_us, read, written, ignored)

    def _write_newest(
        self, view: FeatureView, entity: Entity, source: offline.SourceRows
    ) -> WriteOutcome:
        """Writes the newest row per key of one slice of the source."""
        (codes,) = offline.key_codes(entity, source.table)
        latest = offline.latest_per_key(codes, source.event_us)
        table = source.table.take(latest)
        event_us = source.event_us[latest]
        key_columns = {
            k.name: (
                np.asarray(table[k.name].to_numpy(), dtype=np.int64)
                if k.type is ValueType.INT64
                else table[k.name].to_pylist()
            )
            for k in entity.join_keys
        }
        keys = entity_keys(entity, key_columns)
        cells = []
        for feature in view.features:
            column = offline.declared(
                table[feature.name], feature, f"source column {view.name}.{feature.name}"
            )
            null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            if feature.type is ValueType.STRING:
                values = np.array(column.to_pylist(), dtype=object)
            else:
                filled = column.fill_null(False if feature.type is ValueType.BOOL else 0)
                values = np.asarray(filled.to_numpy())
            cells.append(codec.encode(Column(feature.type, values, null)))
        names = [f.name for f in view.features]
        written = ignored = 0
        times = event_us.tolist()
        for start_row in range(0, len(keys), WRITE_BATCH):
            stop = start_row + WRITE_BATCH
            outcome = self._store.write_rows(
                view.name,
                names,
                keys[start_row:stop],
                times[start_row:stop],
                [column_cells[start_row:stop] for column_cells in cells],
            )
            written += outcome.written
            ignored += outcome.ignored
        return WriteOutcome(written=written, ignored=ignored)
