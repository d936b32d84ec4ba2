"""Where the monitoring service keeps what it acknowledged: SQLite (a file, one process)
by default, PostgreSQL when replicas share one database. One contract, one test suite
(tests/integration/monitoring/test_store_contract.py) for both.

What is stored:
- prediction batches, whole: the columnar `PredictionBatch` bytes of the records that
  were new, with their record keys as one blob (see record_keys.py for why not one SQL
  row per record), numbered by a per-store sequence;
- window statistics: serialized `WindowStatistics` per (model, version, granularity,
  window start, slice key, slice value, replica). Each replica writes only its own rows
  (so no two writers race), readers merge the replicas' rows;
- per replica, the sequence of the last batch its stored statistics include (the
  checkpoint): after a crash the batches after it are replayed, so a restart loses no
  acknowledged record's statistics;
- references (a version's reference distribution), labels joined to their prediction,
  monitor configurations, alerts and the alert evaluator's progress, producer totals.

Every method is blocking (callers run it off the event loop) and may raise Unavailable
when a server store is unreachable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MINUTE_US = 60_000_000
HOUR_US = 60 * MINUTE_US
DAY_US = 24 * HOUR_US
GRANULARITIES_US = (MINUTE_US, HOUR_US, DAY_US)


@dataclass(frozen=True)
class NewBatch:
    """A batch to store: only its new records."""

    model: str
    version: str
    min_time_us: int
    max_time_us: int
    rows: int
    payload: bytes  # a serialized PredictionBatch
    keys: bytes  # the records' uint64 keys, little-endian, in row order


@dataclass(frozen=True)
class StoredBatch:
    seq: int
    replica: str
    model: str
    version: str
    payload: bytes
    keys: bytes


@dataclass(frozen=True, order=True)
class WindowKey:
    model: str
    version: str
    granularity_us: int
    start_us: int
    slice_key: str = ""
    slice_value: str = ""


@dataclass(frozen=True)
class LabelRow:
    """A label joined to its prediction: everything quality needs, in one row."""

    model: str
    request_id: str
    row_index: int
    version: str
    time_us: int  # the prediction's time
    slices: Mapping[str, str]
    prediction: float  # the value the config's prediction_output/column named
    label: float
    label_time_us: int


@dataclass(frozen=True)
class AlertRow:
    id: str
    model: str
    version: str
    rule: str
    subject: str
    state: int  # pb.AlertState
    updated_us: int
    payload: bytes  # a serialized pb.Alert


class MonitoringStore(Protocol):
    # -- prediction batches
    def append_batches(self, replica: str, batches: Sequence[NewBatch]) -> list[int]:
        """Stores the batches in one transaction; their sequence numbers, increasing."""
        ...

    def append(
        self,
        replica: str,
        batches: Sequence[NewBatch],
        producer: str = "",
        totals: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> tuple[list[int], dict[str, tuple[int, int, int]]]:
        """`append_batches` and `producer_deltas` in one transaction (one commit per
        LogPredictions call): the sequence numbers and what the totals grew by."""
        ...

    def batches(self, seqs: Sequence[int]) -> dict[int, StoredBatch]:
        """The stored batches with these sequence numbers (missing ones are absent)."""
        ...

    def batches_after(self, replica: str, seq: int, limit: int) -> list[StoredBatch]:
        """A replica's batches with a sequence above `seq`, oldest first, at most `limit`."""
        ...

    def recent_keys(self, model: str, max_keys: int) -> Iterator[tuple[int, bytes]]:
        """(seq, keys) of a model's batches, newest first, until about max_keys keys."""
        ...

    def models(self) -> list[str]:
        """Every model with stored batches or statistics."""
        ...

    # -- window statistics
    def windows(self, replica: str, keys: Sequence[WindowKey]) -> dict[WindowKey, bytes]:
        """This replica's stored statistics of these windows."""
        ...

    def save_windows(self, replica: str, seq: int, windows: Mapping[WindowKey, bytes]) -> None:
        """Replaces this replica's statistics of these windows and sets its checkpoint to
        `seq`, in one transaction."""
        ...

    def checkpoint(self, replica: str) -> int:
        """The sequence of the last batch this replica's statistics include (0: none)."""
        ...

    def read_windows(
        self,
        model: str,
        version: str,
        granularity_us: int,
        start_us: int,
        end_us: int,
        slice_key: str | None = "",
    ) -> list[tuple[WindowKey, bytes]]:
        """Every replica's statistics of windows starting in [start_us, end_us); one
        slice key (`""`: all rows), or every slice when None. Version "" means any."""
        ...

    # -- references
    def reference(self, model: str, version: str) -> bytes | None: ...

    def save_reference(self, model: str, version: str, reference: bytes) -> bytes:
        """Stores it unless one exists; returns the stored one (the first writer wins)."""
        ...

    # -- labels
    def save_labels(self, rows: Sequence[LabelRow]) -> tuple[int, int]:
        """Inserts or replaces labels by (model, request_id, row_index); (new, replaced)."""
        ...

    def labels(self, model: str, version: str, start_us: int, end_us: int) -> list[LabelRow]:
        """Labels whose prediction time is in [start_us, end_us); version "" means any."""
        ...

    # -- configuration
    def config(self, model: str) -> tuple[bytes, int] | None:
        """(serialized pb.MonitorConfig, revision), or None when never set."""
        ...

    def save_config(self, model: str, expected_revision: int, config: bytes) -> int:
        """Stores it when the stored revision equals `expected_revision` (0: none yet);
        returns the new revision; raises Conflict otherwise."""
        ...

    def configs(self) -> list[tuple[str, bytes]]:
        """Every model's stored configuration."""
        ...

    # -- alerts
    def save_alerts(
        self, alerts: Sequence[AlertRow], cursors: Mapping[tuple[str, str], int]
    ) -> None:
        """Upserts alerts and sets evaluator cursors ((model, rule) → last evaluated
        window end, µs) in one transaction."""
        ...

    def alerts(self, model: str, states: Sequence[int], limit: int) -> list[AlertRow]:
        """Newest first (by updated time); model "" means every model."""
        ...

    def cursor(self, model: str, rule: str) -> int:
        """The end of the last window the rule was evaluated on (0: never)."""
        ...

    # -- producers
    def producer_deltas(
        self, producer: str, totals: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, tuple[int, int, int]]:
        """Stores a producer's running totals per model (dropped, failed, requests) and
        returns what grew since the stored ones (a total that shrank — the producer
        restarted — counts whole)."""
        ...

    # -- leases
    def lease(self, name: str, holder: str, now_us: int, ttl_us: int) -> bool:
        """Takes or renews the lease `name` until now + ttl when it is free, expired or
        already `holder`'s; whether `holder` holds it. One replica evaluates alerts."""
        ...

    # -- retention
    def prune(self, before_us: int) -> int:
        """Deletes batches whose newest record is older than before_us, and minute
        windows and labels older than it; returns batches deleted."""
        ...

    def close(self) -> None: ...


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_store(location: str, schema: str = "") -> MonitoringStore:
    """A postgresql:// URL, or the path of a SQLite file."""
    if is_postgres_url(location):
        from modelplane.services.monitoring.store.postgres import PostgresMonitoringStore

        return PostgresMonitoringStore(location, schema=schema)
    from modelplane.services.monitoring.store.sqlite import SqliteMonitoringStore

    return SqliteMonitoringStore(Path(location))
