"""Ingest: prediction batches in, stored once, counted into window statistics; labels
joined to their predictions.

The path of one LogPredictions call (run off the event loop, one call at a time, so
batch sequence numbers follow commit order):
1. each batch is decoded and checked; a malformed one is rejected whole, a record with
   an infinite value alone (counted per reason, never touching other records);
2. duplicates are found by record key in memory (`RecentKeys`), not by a SQL index;
3. the new records of every batch are stored in one transaction (whole batches, see
   store/), and only then
4. added to the in-memory statistics of their minute windows ("dirty" windows).

`flush` merges the dirty windows into the stored ones at three granularities (minute,
hour, day: roll-ups are merges, never re-reads) and moves the replica's checkpoint in
the same transaction. After a crash, `recover` replays the batches stored after the
checkpoint, so statistics lose no acknowledged record and count none twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import domain
from modelplane.services.monitoring.record_keys import (
    ROW_BITS,
    RecentKeys,
    location,
    record_keys,
)
from modelplane.services.monitoring.references import References
from modelplane.services.monitoring.statistics import (
    COUNTER_MAX,
    WindowStats,
    output_column_names,
)
from modelplane.services.monitoring.store import (
    GRANULARITIES_US,
    MINUTE_US,
    LabelRow,
    MonitoringStore,
    NewBatch,
    StoredBatch,
    WindowKey,
)

log = logging.getLogger("modelplane.monitoring.ingest")

OTHER = "__other__"
MAX_ERRORS = 16
# Dirty windows held before a flush is forced (each holds a few KiB of sketches).
MAX_DIRTY_WINDOWS = 2_000
REPLAY_CHUNK = 64


@dataclass
class IngestResult:
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stored_by_model: dict[str, int] = field(default_factory=dict)
    duplicates_by_model: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str, records: int, error: str = "") -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + records
        if error and len(self.errors) < MAX_ERRORS:
            self.errors.append(error)


@dataclass
class LabelResult:
    matched: int = 0
    updated: int = 0
    unmatched: int = 0


def decode(where: str, b: pb.PredictionBatch, now_us: int) -> domain.PredictionBatch:
    batch = domain.decode_batch(
        where,
        model_name=b.model_name,
        model_version=b.model_version,
        route=b.route,
        request_ids=b.request_ids,
        row_indices=b.row_indices,
        time_unix_us=b.time_unix_us,
        latency_ms=b.latency_ms,
        feature_names=b.feature_names,
        feature_values=b.feature_values,
        output_names=[o.name for o in b.outputs],
        output_widths=[o.width for o in b.outputs],
        output_values=b.output_values,
        slices={s.name: s.values for s in b.slices},
        categorical={c.name: c.values for c in b.categorical_features},
        now_us=now_us,
    )
    clash = set(batch.feature_names) & set(
        output_column_names(batch.output_names, batch.output_widths)
    )
    if clash:
        raise InvalidArgument(
            f"{where}: '{sorted(clash)[0][:64]}' names both a feature and an output column"
        )
    return batch


def subset(batch: domain.PredictionBatch, rows: np.ndarray) -> pb.PredictionBatch:
    """The records at `rows` (a boolean mask) as a batch of their own."""
    picked = np.flatnonzero(rows).tolist()
    return pb.PredictionBatch(
        model_name=batch.model_name,
        model_version=batch.model_version,
        route=batch.route,
        request_ids=[batch.request_ids[i] for i in picked],
        row_indices=batch.row_indices[picked].tolist(),
        time_unix_us=batch.time_us[picked].tolist(),
        latency_ms=batch.latency_ms[picked].tolist(),
        feature_names=batch.feature_names,
        feature_values=np.ascontiguousarray(batch.features[picked]).tobytes(),
        outputs=[
            pb.OutputColumn(name=n, width=w)
            for n, w in zip(batch.output_names, batch.output_widths, strict=True)
        ],
        output_values=np.ascontiguousarray(batch.outputs[picked]).tobytes(),
        slices=[
            pb.StringColumn(name=name, values=[values[i] for i in picked])
            for name, values in batch.slices.items()
        ],
        categorical_features=[
            pb.StringColumn(name=name, values=[values[i] for i in picked])
            for name, values in batch.categorical.items()
        ],
    )


def _with_times(b: pb.PredictionBatch, batch: domain.PredictionBatch) -> pb.PredictionBatch:
    """The batch as stored: with its arrival time written in when the sender left it out,
    so a replay puts its records in the same windows."""
    if len(b.time_unix_us):
        return b
    stored = pb.PredictionBatch()
    stored.CopyFrom(b)
    stored.time_unix_us.extend(batch.time_us.tolist())
    return stored


class Ingestor:
    """Thread-safe; every method blocks (store I/O) and belongs off the event loop."""

    def __init__(
        self,
        store: MonitoringStore,
        references: References,
        replica: str,
        *,
        index_capacity: int = 2_000_000,
        slice_values: int = 32,
        label_lookback_keys: int = 10_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._references = references
        self._replica = self.replica = replica
        self._index_capacity = index_capacity
        self._slice_values_cap = slice_values
        self._label_lookback_keys = label_lookback_keys
        self._clock = clock
        # Serialises appends (sequence order = commit order) and guards the state below.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._indexes: dict[str, RecentKeys] = {}
        self._dirty: dict[WindowKey, WindowStats] = {}
        self._last_seq = 0
        self._flushed_seq = 0
        self._slice_values: dict[tuple[str, str, str], set[str]] = {}

    # -- start
    def recover(self) -> int:
        """Replays this replica's batches stored after its checkpoint; returns how many."""
        seq = self._flushed_seq = self._last_seq = self._store.checkpoint(self._replica)
        replayed = 0
        while batches := self._store.batches_after(self._replica, seq, REPLAY_CHUNK):
            with self._lock:
                for stored in batches:
                    message = pb.PredictionBatch.FromString(stored.payload)
                    self._count(
                        decode("replay", message, 0), np.ones(len(message.request_ids), bool)
                    )
                    self._last_seq = seq = stored.seq
            replayed += len(batches)
            self.flush()
        if replayed:
            log.info("replayed %d batches stored after the last checkpoint", replayed)
        return replayed

    def _index(self, model: str) -> RecentKeys:
        """Under self._lock. Built from the stored key blobs on first use, so a restart
        keeps recognising retried records."""
        index = self._indexes.get(model)
        if index is None:
            index = self._indexes[model] = RecentKeys(self._index_capacity)
            runs = list(self._store.recent_keys(model, self._index_capacity // 2))
            for seq, blob in reversed(runs):
                keys = np.frombuffer(blob, dtype="<u8")
                index.add(keys, location(seq, np.arange(len(keys))))
        return index

    # -- predictions
    def ingest(
        self,
        batches: Sequence[pb.PredictionBatch],
        producer: str = "",
        counters: Sequence[pb.ProducerCounters] = (),
    ) -> IngestResult:
        now_us = int(self._clock() * 1_000_000)
        domain.check_call_size(sum(len(b.request_ids) for b in batches))
        if counters and not producer:
            # Refused before anything is stored: a failed call must store nothing, or
            # its retry would find its records stored already.
            raise InvalidArgument("producer_id is required with counters")
        result = IngestResult()
        decoded = []
        for index, message in enumerate(batches):
            where = f"batches[{index}]"
            try:
                batch = decode(where, message, now_us)
            except InvalidArgument as exc:
                result.reject("invalid_batch", len(message.request_ids), exc.message)
                continue
            keys = record_keys(batch.request_ids, batch.row_indices)
            decoded.append((message, batch, keys))
        totals = {
            c.model_name: (c.dropped_records, c.failed_requests, c.requests)
            for c in counters
            if c.model_name
        }
        if any(n > COUNTER_MAX for total in totals.values() for n in total):
            # uint64 on the wire; stored as (signed 64-bit) SQL integers.
            raise InvalidArgument(f"producer counters must be at most {COUNTER_MAX}")
        with self._lock:
            deltas = self._store_new(decoded, result, producer, totals)
            self._count_producers(deltas, now_us)
            self._count_rejected(result, batches, now_us)
        if len(self._dirty) > MAX_DIRTY_WINDOWS:
            self.flush()
        return result

    def _store_new(
        self,
        decoded: Sequence[tuple[pb.PredictionBatch, domain.PredictionBatch, np.ndarray]],
        result: IngestResult,
        producer: str,
        totals: Mapping[str, tuple[int, int, int]],
    ) -> dict[str, tuple[int, int, int]]:
        """Under self._lock. Stores the new records and the producer's totals in one
        transaction; returns what the totals grew by."""
        pending = []
        seen_in_call: dict[str, list[np.ndarray]] = {}
        for message, batch, keys in decoded:
            finite = batch.finite_rows()
            if not finite.all():
                result.reject("non_finite", int((~finite).sum()))
            first = np.zeros(len(keys), dtype=bool)
            first[np.unique(keys, return_index=True)[1]] = True
            known = self._index(batch.model_name).find(keys) >= 0
            earlier = seen_in_call.setdefault(batch.model_name, [])
            for other in earlier:
                known |= np.isin(keys, other)
            keep = finite & first & ~known
            duplicates = int((finite & ~keep).sum())
            if duplicates:
                result.duplicates += duplicates
                by_model = result.duplicates_by_model
                by_model[batch.model_name] = by_model.get(batch.model_name, 0) + duplicates
            if not keep.any():
                continue
            earlier.append(keys[keep])
            payload = _with_times(message, batch) if keep.all() else subset(batch, keep)
            kept_times = batch.time_us[keep]
            pending.append(
                (
                    batch,
                    keep,
                    keys[keep],
                    NewBatch(
                        model=batch.model_name,
                        version=batch.model_version,
                        min_time_us=int(kept_times.min()),
                        max_time_us=int(kept_times.max()),
                        rows=int(keep.sum()),
                        payload=payload.SerializeToString(),
                        keys=keys[keep].astype("<u8").tobytes(),
                    ),
                )
            )
        if not pending and not totals:
            return {}
        seqs, deltas = self._store.append(self._replica, [p[3] for p in pending], producer, totals)
        for (batch, keep, keys, new), seq in zip(pending, seqs, strict=True):
            self._index(batch.model_name).add(keys, location(seq, np.arange(len(keys))))
            self._count(batch, keep)
            self._last_seq = seq
            result.stored += new.rows
            by_model = result.stored_by_model
            by_model[batch.model_name] = by_model.get(batch.model_name, 0) + new.rows
        return deltas

    def _window(self, key: WindowKey) -> WindowStats:
        window = self._dirty.get(key)
        if window is None:
            window = self._dirty[key] = WindowStats()
        return window

    def _count(self, batch: domain.PredictionBatch, keep: np.ndarray) -> None:
        """Adds the kept records to their minute windows, overall and per slice value."""
        model, version = batch.model_name, batch.model_version
        edges = self._references.edges(model, version)
        output_names = output_column_names(batch.output_names, batch.output_widths)
        minutes = batch.time_us // MINUTE_US
        for minute in np.unique(minutes[keep]):
            rows = keep & (minutes == minute) if len(np.unique(minutes)) > 1 else keep
            start = int(minute) * MINUTE_US
            everything = WindowKey(model, version, MINUTE_US, start)
            self._add(self._window(everything), batch, rows, output_names, edges)
            if self._references.waiting(model, version):
                self._references.observe(
                    model, version, self._add(WindowStats(), batch, rows, output_names, {})
                )
            for slice_key, values in batch.slices.items():
                for value, value_rows in self._slice_groups(
                    model, version, slice_key, values, rows
                ):
                    key = dataclasses.replace(everything, slice_key=slice_key, slice_value=value)
                    self._add(self._window(key), batch, value_rows, output_names, edges)

    @staticmethod
    def _add(
        window: WindowStats,
        batch: domain.PredictionBatch,
        rows: np.ndarray,
        output_names: Sequence[str],
        edges: Mapping[str, np.ndarray],
    ) -> WindowStats:
        whole = rows.all()
        picked = slice(None) if whole else np.flatnonzero(rows)
        window.add_rows(
            batch.features[picked],
            batch.feature_names,
            batch.outputs[picked],
            output_names,
            {
                name: (values if whole else np.asarray(values)[picked])
                for name, values in batch.categorical.items()
            },
            batch.latency_ms[picked],
            edges,
        )
        window.add_records(batch.route, batch.time_us[picked], batch.latency_ms[picked])
        return window

    def _slice_groups(
        self, model: str, version: str, slice_key: str, values: Sequence[str], rows: np.ndarray
    ) -> list[tuple[str, np.ndarray]]:
        """Rows per slice value; values beyond the first few of a key count as OTHER, so
        one high-cardinality key (a user id sent as a slice) cannot grow memory."""
        array = np.asarray(values)
        known = self._slice_values.setdefault((model, version, slice_key), set())
        groups = []
        for value in np.unique(array[rows]).tolist():
            if value not in known and len(known) < self._slice_values_cap:
                known.add(value)
            label = value if value in known else OTHER
            groups.append((label, rows & (array == value)))
        merged: dict[str, np.ndarray] = {}
        for label, mask in groups:
            merged[label] = merged[label] | mask if label in merged else mask
        return list(merged.items())

    def _count_producers(self, deltas: Mapping[str, tuple[int, int, int]], now_us: int) -> None:
        minute = now_us // MINUTE_US * MINUTE_US
        for model, (dropped, failed, requests) in deltas.items():
            window = self._window(WindowKey(model, "", MINUTE_US, minute))
            window.add_producer_counts(dropped, failed, requests)

    def _count_rejected(
        self, result: IngestResult, batches: Sequence[pb.PredictionBatch], now_us: int
    ) -> None:
        if not result.rejected:
            return
        # Attributed to the call's first model: a rejected batch may not name its own.
        model = next((b.model_name for b in batches if b.model_name), "")
        if not model:
            return
        window = self._window(WindowKey(model, "", MINUTE_US, now_us // MINUTE_US * MINUTE_US))
        for reason, records in result.rejected.items():
            window.rejected[reason] = window.rejected.get(reason, 0) + records

    # -- flushing
    def flush(self) -> None:
        """Merges the dirty windows into the stored minute, hour and day windows and
        moves the checkpoint, in one transaction."""
        with self._flush_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, {}
                seq = self._last_seq
            if not dirty and seq == self._flushed_seq:
                return
            # Minute windows take their delta as it is (each is dirty once); hours and
            # days sum several, into copies, so `dirty` stays intact for a retry.
            targets: dict[WindowKey, WindowStats] = dict(dirty)
            for key, delta in dirty.items():
                for granularity in GRANULARITIES_US[1:]:
                    target = dataclasses.replace(
                        key,
                        granularity_us=granularity,
                        start_us=key.start_us // granularity * granularity,
                    )
                    if target in targets:
                        targets[target].merge(delta)
                    else:
                        targets[target] = delta.copy()
            try:
                stored = self._store.windows(self._replica, list(targets))
                merged = {}
                for key, delta in targets.items():
                    if key not in stored:
                        merged[key] = delta.to_bytes()
                        continue
                    window = WindowStats.from_bytes(stored[key])
                    window.merge(delta)
                    merged[key] = window.to_bytes()
                self._store.save_windows(self._replica, seq, merged)
            except Exception:
                with self._lock:  # keep the deltas for the next flush
                    for key, delta in dirty.items():
                        if key in self._dirty:
                            delta.merge(self._dirty[key])
                        self._dirty[key] = delta
                raise
            self._flushed_seq = seq

    # -- labels
    def log_labels(
        self, batches: Sequence[pb.LabelBatch], prediction_of: Callable[[str], tuple[str, int]]
    ) -> LabelResult:
        """`prediction_of(model)` names the output and column holding the prediction."""
        now_us = int(self._clock() * 1_000_000)
        domain.check_call_size(sum(len(b.request_ids) for b in batches))
        rows: list[LabelRow] = []
        for index, label_batch in enumerate(batches):
            where = f"batches[{index}]"
            ids, row_indices, values = _checked_labels(where, label_batch)
            keys = record_keys(ids, row_indices)
            locations = self._find(label_batch.model_name, keys)
            found = locations >= 0
            stored = self._store.batches(sorted(set((locations[found] >> ROW_BITS).tolist())))
            output, column = prediction_of(label_batch.model_name)
            rows.extend(
                _label_rows(
                    label_batch.model_name,
                    ids,
                    row_indices,
                    values,
                    locations,
                    stored,
                    output,
                    column,
                    now_us,
                )
            )
        new, replaced = self._store.save_labels(rows) if rows else (0, 0)
        total = sum(len(b.request_ids) for b in batches)
        return LabelResult(matched=new, updated=replaced, unmatched=total - len(rows))

    def _find(self, model: str, keys: np.ndarray) -> np.ndarray:
        """Where each record is stored: the recent-key index first, then the stored key
        blobs newest first, as far back as the label lookback."""
        with self._lock:
            locations = self._index(model).find(keys)
        missing = locations < 0
        if not missing.any():
            return locations
        wanted = keys[missing]
        found = np.full(len(wanted), -1, dtype=np.int64)
        for seq, blob in self._store.recent_keys(model, self._label_lookback_keys):
            stored_keys = np.frombuffer(blob, dtype="<u8")
            order = np.argsort(stored_keys)
            at = np.searchsorted(stored_keys, wanted, sorter=order)
            at[at == len(stored_keys)] = 0
            hit = (stored_keys[order[at]] == wanted) & (found < 0)
            found[hit] = location(seq, order[at[hit]])
            if (found >= 0).all():
                break
        locations[missing] = found
        return locations


def _checked_labels(where: str, batch: pb.LabelBatch) -> tuple[list[str], np.ndarray, np.ndarray]:
    if not batch.model_name:
        raise InvalidArgument(f"{where}.model_name is empty")
    ids = list(batch.request_ids)
    if not ids:
        raise InvalidArgument(f"{where}.request_ids is empty")
    if not all(ids):
        raise InvalidArgument(f"{where}.request_ids[{ids.index('')}] is empty")
    if len(batch.values) != len(ids):
        raise InvalidArgument(f"{where}.values has {len(batch.values)} entries for {len(ids)} ids")
    if len(batch.row_indices) not in (0, len(ids)):
        raise InvalidArgument(f"{where}.row_indices has {len(batch.row_indices)} entries")
    values = np.asarray(batch.values, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InvalidArgument(f"{where}.values[{bad}] is not a finite number")
    rows = (
        np.asarray(batch.row_indices, dtype=np.int64)
        if len(batch.row_indices)
        else np.zeros(len(ids), dtype=np.int64)
    )
    return ids, rows, values


def _label_rows(
    model: str,
    ids: Sequence[str],
    row_indices: np.ndarray,
    values: np.ndarray,
    locations: np.ndarray,
    stored: Mapping[int, StoredBatch],
    output: str,
    column: int,
    now_us: int,
) -> list[LabelRow]:
    decoded: dict[int, tuple[domain.PredictionBatch, int]] = {}
    rows = []
    for i in np.flatnonzero(locations >= 0).tolist():
        seq, row = int(locations[i]) >> ROW_BITS, int(locations[i]) & ((1 << ROW_BITS) - 1)
        if seq not in stored:
            continue  # pruned meanwhile
        if seq not in decoded:
            batch = decode("stored", pb.PredictionBatch.FromString(stored[seq].payload), 0)
            decoded[seq] = (batch, _prediction_column(batch, output, column))
        batch, at = decoded[seq]
        if at < 0:
            continue  # the prediction output is not in the record: nothing to judge
        rows.append(
            LabelRow(
                model=model,
                request_id=ids[i],
                row_index=int(row_indices[i]),
                version=batch.model_version,
                time_us=int(batch.time_us[row]),
                slices={name: values_[row] for name, values_ in batch.slices.items()},
                prediction=float(batch.outputs[row, at]),
                label=float(values[i]),
                label_time_us=now_us,
            )
        )
    return rows


def _prediction_column(batch: domain.PredictionBatch, output: str, column: int) -> int:
    """The column of the outputs matrix holding the prediction; -1 when absent."""
    offset = 0
    for name, width in zip(batch.output_names, batch.output_widths, strict=True):
        if (output in ("", name)) and column < width:
            return offset + column
        offset += width
    return -1


def stored_records(
    store: MonitoringStore, model: str, limit_keys: int = 1_000_000
) -> list[domain.StoredRecord]:
    """A model's stored records, oldest first, one per row: for tests, exports and
    debugging (the service itself never reads records back, only statistics)."""
    seqs = [seq for seq, _ in store.recent_keys(model, limit_keys)]
    records = []
    for _, stored in sorted(store.batches(seqs).items()):
        batch = decode("stored", pb.PredictionBatch.FromString(stored.payload), 0)
        for row in range(batch.rows):
            outputs: dict[str, tuple[float, ...]] = {}
            offset = 0
            for name, width in zip(batch.output_names, batch.output_widths, strict=True):
                outputs[name] = tuple(batch.outputs[row, offset : offset + width].tolist())
                offset += width
            records.append(
                domain.StoredRecord(
                    model_name=batch.model_name,
                    model_version=batch.model_version,
                    route=batch.route,
                    request_id=batch.request_ids[row],
                    row_index=int(batch.row_indices[row]),
                    time=datetime.fromtimestamp(int(batch.time_us[row]) / 1e6, tz=UTC),
                    latency_ms=float(batch.latency_ms[row]),
                    features=dict(
                        zip(batch.feature_names, batch.features[row].tolist(), strict=True)
                    ),
                    outputs=outputs,
                    slices={name: values[row] for name, values in batch.slices.items()},
                )
            )
    return records
