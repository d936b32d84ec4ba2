"""Materialization: the newest source row per entity in a time range → the online store.

Incremental by default: each view remembers the end of the last range it
materialized (its watermark) and the next run starts there. Rows are written
under the store's event-time rule, so re-running a range, or racing a push of
fresher values, never puts an older value back. The source is read in slices, so
its size is not bounded by memory; a run that fails part way leaves the watermark
where it was, and the next run rewrites the same rows (idempotently).

Two passes over the range: the first reads only the join keys and event times and
finds each entity's newest row (a later file row wins a tie); the second writes those
rows and no others. So every entity in the range is written once, and `rows_written`
and `rows_ignored` count entities, as the contract says, whichever slices (Parquet
row groups, files) its rows sit in: writing the newest row of each slice instead
counted an entity once per slice it appeared in (1,898 rows of 300 entities in row
groups of 700: 481). Memory holds the keys, event time and position of one row per
entity, not the features.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from modelplane.kernel.errors import FailedPrecondition, InvalidArgument, ModelplaneError
from modelplane.services.feature import codec, offline
from modelplane.services.feature.codec import Column
from modelplane.services.feature.definitions import DefinitionRegistry
from modelplane.services.feature.domain import Entity, FeatureView, ValueType, entity_keys
from modelplane.services.feature.files import FileRoots
from modelplane.services.feature.online import now_us
from modelplane.services.feature.online_store import OnlineStore, WriteOutcome

_log = logging.getLogger(__name__)

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
    # Why this view was not materialized (the others were); None when it was.
    error: Exception | None = None


class Materializer:
    def __init__(
        self,
        registry: DefinitionRegistry,
        store: OnlineStore,
        watermarks: WatermarkStore,
        clock_us: Callable[[], int] = now_us,
        slice_rows: int = offline.SLICE_ROWS,
        roots: FileRoots | None = None,
    ) -> None:
        self._registry = registry
        self._roots = roots
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
        # One view's bad source must not stop the others: each view is its own run,
        # and a failure is that view's result (the caller decides what it means).
        results = []
        for view in chosen:
            try:
                results.append(self._one(view, start_us, end))
            except Exception as exc:
                if not isinstance(exc, ModelplaneError):
                    _log.exception("materializing feature view %s failed", view.name)
                results.append(Materialized(view.name, start_us or 0, end, 0, 0, 0, exc))
        return results

    def _one(self, view: FeatureView, start_us: int | None, end_us: int) -> Materialized:
        with self._lock(view.name):
            watermark = self._watermarks.watermark(view.name)
            start = start_us if start_us is not None else (watermark or 0)
            if start >= end_us:
                return Materialized(view.name, start, end_us, 0, 0, 0)
            entity = self._registry.catalog.entity(view.entity)
            dataset = offline.open_source(view, self._roots)
            positions, newest_us, read = self._newest_rows(view, entity, dataset, start, end_us)
            written = ignored = 0
            scanned = 0
            slices = offline.scan_source(
                view, entity, view.features, start, end_us, self._slice_rows, dataset
            )
            for source in slices:
                first, stop = np.searchsorted(positions, [scanned, scanned + len(source.event_us)])
                chosen = positions[first:stop] - scanned
                scanned += len(source.event_us)
                if not np.array_equal(source.event_us[chosen], newest_us[first:stop]):
                    raise _changed(view)
                # A slice with no newest row is still converted: a bad column fails the
                # run whichever rows it holds.
                outcome = self._write(
                    view, entity, source.table.take(chosen), newest_us[first:stop]
                )
                written += outcome.written
                ignored += outcome.ignored
            if scanned != read:
                raise _changed(view)
            if watermark is None or end_us > watermark:
                self._watermarks.set_watermark(view.name, end_us)
            return Materialized(view.name, start, end_us, read, written, ignored)

    def _newest_rows(
        self, view: FeatureView, entity: Entity, dataset: ds.Dataset, start_us: int, end_us: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """The first pass: the position in the scan of each entity's newest row in the
        range (ascending) with its event time, and the rows in the range."""
        targets = [
            (k.name, pa.int64() if k.type is ValueType.INT64 else pa.string())
            for k in entity.join_keys
        ]
        kept: list[tuple[pa.Table, np.ndarray, np.ndarray]] = []
        kept_rows = pending_rows = read = 0
        for source in offline.scan_source(
            view, entity, [], start_us, end_us, self._slice_rows, dataset
        ):
            count = len(source.event_us)
            (codes,) = offline.key_codes(entity, source.table)  # checks the key columns too
            latest = offline.latest_per_key(codes, source.event_us)
            # One key type for every slice, whatever each file declares, so slices concatenate.
            keys = pa.table(
                {name: pc.cast(source.table[name], target) for name, target in targets}
            ).take(latest)
            kept.append((keys, latest + read, source.event_us[latest]))
            read += count
            pending_rows += len(latest)
            # Folded when the rows kept since the last fold outnumber those before it, so
            # the work stays proportional to the rows kept, and memory to twice the entities.
            if pending_rows > max(kept_rows, self._slice_rows):
                kept = [_newest_of(entity, kept)]
                kept_rows, pending_rows = len(kept[0][1]), 0
        if not kept:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
        _, positions, newest_us = _newest_of(entity, kept)
        return positions, newest_us, read

    def _write(
        self, view: FeatureView, entity: Entity, table: pa.Table, event_us: np.ndarray
    ) -> WriteOutcome:
        """Writes rows of the source, at most one per entity."""
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


def _newest_of(
    entity: Entity, parts: Sequence[tuple[pa.Table, np.ndarray, np.ndarray]]
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The newest row of each entity among parts given in scan order (keys, positions,
    event times); a tie goes to the later position, as in one pass over the source."""
    keys = pa.concat_tables([p[0] for p in parts])
    positions = np.concatenate([p[1] for p in parts])
    event_us = np.concatenate([p[2] for p in parts])
    (codes,) = offline.key_codes(entity, keys)
    # Rows are in position order, so the later row of a tie is also the later index;
    # the indices come back ascending, which keeps them so.
    newest = offline.latest_per_key(codes, event_us)
    return keys.take(newest), positions[newest], event_us[newest]


def _changed(view: FeatureView) -> FailedPrecondition:
    return FailedPrecondition(
        f"the source of feature view {view.name!r} changed while it was being materialized;"
        " run again"
    )


def failure_of_call(results: Sequence[Materialized], named: bool) -> Exception | None:
    """The error a Materialize call ends with: the first failed view's, when the call
    named its views or when every view failed; None when an unfiltered run did some views
    (the failed ones are reported beside them)."""
    failed = [r.error for r in results if r.error is not None]
    if failed and (named or len(failed) == len(results)):
        return failed[0]
    return None
