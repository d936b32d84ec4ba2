"""The monitoring store's SQL that SQLite and PostgreSQL run alike: the schema (each
dialect fills in its types), the reads, and the writes whose statements are the same.

Statements are written with `?` placeholders, translated for psycopg. The subclasses
supply connections and transactions, and the statements that differ: PostgreSQL's
writes are set-based (one `unnest` of arrays per table, see postgres.py) and race-safe
across replicas, SQLite's are a statement per row inside its one writer's transaction.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from modelplane.kernel.errors import Conflict
from modelplane.services.monitoring.store import (
    MINUTE_US,
    AlertRow,
    LabelRow,
    StoredBatch,
    WindowKey,
)

# {seq}: the batch number column, which is never reused; {int}, {bytes}, {float}: types.
SCHEMA = """
CREATE TABLE IF NOT EXISTS monitoring_batches (
    seq {seq},
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    min_time_us {int} NOT NULL,
    max_time_us {int} NOT NULL,
    rows {int} NOT NULL,
    payload {bytes} NOT NULL,
    keys {bytes} NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_batches_by_model ON monitoring_batches (model, seq);
CREATE TABLE IF NOT EXISTS monitoring_windows (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    granularity_us {int} NOT NULL,
    start_us {int} NOT NULL,
    slice_key TEXT NOT NULL,
    slice_value TEXT NOT NULL,
    replica TEXT NOT NULL,
    stats {bytes} NOT NULL,
    PRIMARY KEY (model, granularity_us, slice_key, start_us, version, slice_value, replica)
);
CREATE TABLE IF NOT EXISTS monitoring_checkpoints (
    replica TEXT PRIMARY KEY,
    seq {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_references (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    reference {bytes} NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS monitoring_labels (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row_index {int} NOT NULL,
    version TEXT NOT NULL,
    time_us {int} NOT NULL,
    slices TEXT NOT NULL,
    prediction {float} NOT NULL,
    label {float} NOT NULL,
    label_time_us {int} NOT NULL,
    PRIMARY KEY (model, request_id, row_index)
);
CREATE INDEX IF NOT EXISTS monitoring_labels_by_time ON monitoring_labels (model, time_us);
CREATE TABLE IF NOT EXISTS monitoring_configs (
    model TEXT PRIMARY KEY,
    revision {int} NOT NULL,
    config {bytes} NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_alerts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    state INTEGER NOT NULL,
    updated_us {int} NOT NULL,
    payload {bytes} NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_alerts_by_time ON monitoring_alerts (updated_us);
CREATE TABLE IF NOT EXISTS monitoring_cursors (
    model TEXT NOT NULL,
    rule TEXT NOT NULL,
    window_end_us {int} NOT NULL,
    PRIMARY KEY (model, rule)
);
CREATE TABLE IF NOT EXISTS monitoring_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_us {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_producers (
    producer TEXT NOT NULL,
    model TEXT NOT NULL,
    dropped {int} NOT NULL,
    failed {int} NOT NULL,
    requests {int} NOT NULL,
    PRIMARY KEY (producer, model)
);
"""

BATCH_COLUMNS = "seq, replica, model, version, payload, keys"
WINDOW_COLUMNS = "model, version, granularity_us, start_us, slice_key, slice_value"
_LABEL_COLUMNS = (
    "model, request_id, row_index, version, time_us, slices, prediction, label, label_time_us"
)
_ALERT_COLUMNS = "id, model, version, rule, subject, state, updated_us, payload"

# Takes the lease when free, expired or already ours; the holder reads it back.
_LEASE = (
    "INSERT INTO monitoring_leases (name, holder, expires_us) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
    " expires_us = excluded.expires_us"
    " WHERE monitoring_leases.holder = excluded.holder OR monitoring_leases.expires_us < ?"
)


def grown(old: tuple[int, int, int] | None, new: tuple[int, int, int]) -> tuple[int, int, int]:
    """What running totals grew by; a total below the stored one means the producer
    restarted and counts from zero, so it counts whole."""
    if old is None:
        return new
    return tuple(n - o if n >= o else n for o, n in zip(old, new, strict=True))  # type: ignore[return-value]


def stored_batch(row: Sequence[Any]) -> StoredBatch:
    """A row of BATCH_COLUMNS."""
    seq, replica, model, version, payload, keys = row
    return StoredBatch(int(seq), replica, model, version, bytes(payload), bytes(keys))


def revision_conflict(model: str, current: int, expected: int) -> Conflict:
    return Conflict(
        f"monitor config of '{model[:64]}' is at revision {current},"
        f" not {expected}: read it again and retry"
    )


class Tx:
    """One open transaction: runs statements written with `?` placeholders."""

    def __init__(self, executor: Any, placeholder: str) -> None:
        self._executor = executor  # a psycopg cursor or a sqlite3 connection
        self._placeholder = placeholder

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        """The cursor holding the statement's result."""
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        return self._executor.execute(sql, tuple(params))


class SqlMonitoringStore(ABC):
    """The MonitoringStore methods whose SQL both dialects share."""

    # Ties in time are broken by id in byte order, which PostgreSQL needs to be told.
    _ID_ORDER = "id"

    @abstractmethod
    def _tx(self, write: bool) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def _state_filter(self, states: Sequence[int]) -> tuple[str, list[object]]:
        """The condition that the alert's state is one of `states`, and its parameters."""

    def _rows_of_version(self, query: str, params: list[object], version: str) -> list[Any]:
        """The rows `query` selects, of `version` only unless it is "" (any version)."""
        if version:
            query += " AND version = ?"
            params.append(version)
        with self._tx(write=False) as tx:
            return list(tx.execute(query, params).fetchall())

    # -- prediction batches
    def batches_after(self, replica: str, seq: int, limit: int) -> list[StoredBatch]:
        with self._tx(write=False) as tx:
            rows = tx.execute(
                f"SELECT {BATCH_COLUMNS} FROM monitoring_batches"
                " WHERE replica = ? AND seq > ? ORDER BY seq LIMIT ?",
                (replica, seq, limit),
            ).fetchall()
        return [stored_batch(row) for row in rows]

    def recent_keys(self, model: str, max_keys: int) -> Iterator[tuple[int, bytes]]:
        # A page per transaction: nothing is held while the caller consumes.
        seen = 0
        last: int | None = None
        while seen < max_keys:
            query = "SELECT seq, keys FROM monitoring_batches WHERE model = ?"
            params: list[object] = [model]
            if last is not None:
                query += " AND seq < ?"
                params.append(last)
            with self._tx(write=False) as tx:
                rows = tx.execute(query + " ORDER BY seq DESC LIMIT 256", params).fetchall()
            if not rows:
                return
            for seq, keys in rows:
                yield int(seq), bytes(keys)
                seen += len(keys) // 8
                last = int(seq)
                if seen >= max_keys:
                    return

    # -- window statistics
    def checkpoint(self, replica: str) -> int:
        with self._tx(write=False) as tx:
            row = tx.execute(
                "SELECT seq FROM monitoring_checkpoints WHERE replica = ?", (replica,)
            ).fetchone()
        return int(row[0]) if row else 0

    def read_windows(
        self,
        model: str,
        version: str,
        granularity_us: int,
        start_us: int,
        end_us: int,
        slice_key: str | None = "",
    ) -> list[tuple[WindowKey, bytes]]:
        query = (
            f"SELECT {WINDOW_COLUMNS}, stats FROM monitoring_windows"
            " WHERE model = ? AND granularity_us = ? AND start_us >= ? AND start_us < ?"
        )
        params: list[object] = [model, granularity_us, start_us, end_us]
        if slice_key is not None:
            query += " AND slice_key = ?"
            params.append(slice_key)
        return [
            (WindowKey(m, v, int(g), int(s), sk, sv), bytes(stats))
            for m, v, g, s, sk, sv, stats in self._rows_of_version(query, params, version)
        ]

    # -- references
    def reference(self, model: str, version: str) -> bytes | None:
        with self._tx(write=False) as tx:
            row = tx.execute(
                "SELECT reference FROM monitoring_references WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
        return bytes(row[0]) if row else None

    def save_reference(self, model: str, version: str, reference: bytes) -> bytes:
        with self._tx(write=True) as tx:
            # Under a race in PostgreSQL the INSERT waits for the other writer's commit
            # and does nothing; the SELECT, a statement of its own (its own snapshot in
            # READ COMMITTED), then sees the winner's row.
            tx.execute(
                "INSERT INTO monitoring_references (model, version, reference)"
                " VALUES (?, ?, ?) ON CONFLICT (model, version) DO NOTHING",
                (model, version, reference),
            )
            row = tx.execute(
                "SELECT reference FROM monitoring_references WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    # -- labels
    def labels(self, model: str, version: str, start_us: int, end_us: int) -> list[LabelRow]:
        query = (
            f"SELECT {_LABEL_COLUMNS} FROM monitoring_labels WHERE model = ?"
            " AND time_us >= ? AND time_us < ?"
        )
        params: list[object] = [model, start_us, end_us]
        return [
            LabelRow(m, r, int(i), v, int(t), json.loads(s), p, lab, int(lt))
            for m, r, i, v, t, s, p, lab, lt in self._rows_of_version(query, params, version)
        ]

    # -- configuration
    def config(self, model: str) -> tuple[bytes, int] | None:
        with self._tx(write=False) as tx:
            row = tx.execute(
                "SELECT config, revision FROM monitoring_configs WHERE model = ?", (model,)
            ).fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    def configs(self) -> list[tuple[str, bytes]]:
        with self._tx(write=False) as tx:
            rows = tx.execute("SELECT model, config FROM monitoring_configs").fetchall()
        return [(m, bytes(c)) for m, c in rows]

    # -- alerts
    def alerts(self, model: str, states: Sequence[int], limit: int) -> list[AlertRow]:
        query = f"SELECT {_ALERT_COLUMNS} FROM monitoring_alerts WHERE 1 = 1"
        params: list[object] = []
        if model:
            query += " AND model = ?"
            params.append(model)
        if states:
            condition, values = self._state_filter(states)
            query += f" AND {condition}"
            params.extend(values)
        query += f" ORDER BY updated_us DESC, {self._ID_ORDER} LIMIT ?"
        params.append(limit)
        with self._tx(write=False) as tx:
            rows = tx.execute(query, params).fetchall()
        return [
            AlertRow(i, m, v, r, s, int(st), int(u), bytes(p)) for i, m, v, r, s, st, u, p in rows
        ]

    def cursor(self, model: str, rule: str) -> int:
        with self._tx(write=False) as tx:
            row = tx.execute(
                "SELECT window_end_us FROM monitoring_cursors WHERE model = ? AND rule = ?",
                (model, rule),
            ).fetchone()
        return int(row[0]) if row else 0

    # -- leases
    def lease(self, name: str, holder: str, now_us: int, ttl_us: int) -> bool:
        with self._tx(write=True) as tx:
            tx.execute(_LEASE, (name, holder, now_us + ttl_us, now_us))
            row = tx.execute(
                "SELECT holder FROM monitoring_leases WHERE name = ?", (name,)
            ).fetchone()
        return row is not None and row[0] == holder

    # -- retention
    def prune(self, before_us: int) -> int:
        with self._tx(write=True) as tx:
            deleted = tx.execute(
                "DELETE FROM monitoring_batches WHERE max_time_us < ?", (before_us,)
            ).rowcount
            tx.execute(
                "DELETE FROM monitoring_windows WHERE granularity_us = ? AND start_us < ?",
                (MINUTE_US, before_us - MINUTE_US),
            )
            tx.execute("DELETE FROM monitoring_labels WHERE time_us < ?", (before_us,))
        return int(deleted)
