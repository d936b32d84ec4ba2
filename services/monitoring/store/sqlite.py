"""The monitoring store in one SQLite file: the default, for one monitoring process."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from modelplane.services.monitoring.store import (
    AlertRow,
    LabelRow,
    NewBatch,
    StoredBatch,
    WindowKey,
    sql,
)
from modelplane.services.monitoring.store.sql import (
    BATCH_COLUMNS,
    SqlMonitoringStore,
    Tx,
    grown,
    revision_conflict,
    stored_batch,
)

SCHEMA = sql.SCHEMA.format(
    # AUTOINCREMENT: a number is never reused, even after the newest batches are pruned
    # (checkpoints and the record-key index refer to batches by number).
    seq="INTEGER PRIMARY KEY AUTOINCREMENT",
    int="INTEGER",
    bytes="BLOB",
    float="REAL",
)


class SqliteMonitoringStore(SqlMonitoringStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the service acknowledges it.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction. BEGIN IMMEDIATE takes the file's write lock before the
        first read, so a read-then-write (compare-and-set, producer totals, label counts)
        stays atomic against another connection to the same file, not only against this
        instance's threads."""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            yield

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Tx]:
        if write:
            with self._write():
                yield Tx(self._conn, "?")
        else:
            # Each read is one statement: keeping the connection to one thread is enough.
            with self._lock:
                yield Tx(self._conn, "?")

    def _state_filter(self, states: Sequence[int]) -> tuple[str, list[object]]:
        return f"state IN ({','.join('?' * len(states))})", list(states)

    # -- prediction batches
    def append_batches(self, replica: str, batches: Sequence[NewBatch]) -> list[int]:
        return self.append(replica, batches)[0]

    def append(
        self,
        replica: str,
        batches: Sequence[NewBatch],
        producer: str = "",
        totals: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> tuple[list[int], dict[str, tuple[int, int, int]]]:
        with self._write():
            deltas = self._producer_deltas(producer, totals) if totals else {}
            seqs = []
            for b in batches:
                cursor = self._conn.execute(
                    "INSERT INTO monitoring_batches (replica, model, version, min_time_us,"
                    " max_time_us, rows, payload, keys) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        replica,
                        b.model,
                        b.version,
                        b.min_time_us,
                        b.max_time_us,
                        b.rows,
                        b.payload,
                        b.keys,
                    ),
                )
                seqs.append(int(cursor.lastrowid or 0))
            return seqs, deltas

    def batches(self, seqs: Sequence[int]) -> dict[int, StoredBatch]:
        found: dict[int, StoredBatch] = {}
        unique = sorted(set(seqs))
        with self._lock:
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                rows = self._conn.execute(
                    f"SELECT {BATCH_COLUMNS} FROM monitoring_batches"
                    f" WHERE seq IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                found.update((row[0], stored_batch(row)) for row in rows)
        return found

    def models(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT model FROM monitoring_windows UNION"
                " SELECT DISTINCT model FROM monitoring_batches"
            ).fetchall()
        return sorted(r[0] for r in rows)

    # -- window statistics
    _KEY = "model = ? AND granularity_us = ? AND slice_key = ? AND start_us = ? AND version = ?"
    _KEY += " AND slice_value = ? AND replica = ?"

    @staticmethod
    def _key_params(key: WindowKey, replica: str) -> tuple[object, ...]:
        return (
            key.model,
            key.granularity_us,
            key.slice_key,
            key.start_us,
            key.version,
            key.slice_value,
            replica,
        )

    def windows(self, replica: str, keys: Sequence[WindowKey]) -> dict[WindowKey, bytes]:
        found = {}
        with self._lock:
            for key in keys:
                row = self._conn.execute(
                    f"SELECT stats FROM monitoring_windows WHERE {self._KEY}",
                    self._key_params(key, replica),
                ).fetchone()
                if row is not None:
                    found[key] = row[0]
        return found

    def save_windows(self, replica: str, seq: int, windows: Mapping[WindowKey, bytes]) -> None:
        with self._write():
            self._conn.executemany(
                "INSERT INTO monitoring_windows (model, granularity_us, slice_key, start_us,"
                " version, slice_value, replica, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (model, granularity_us, slice_key, start_us, version,"
                " slice_value, replica) DO UPDATE SET stats = excluded.stats",
                [(*self._key_params(key, replica), stats) for key, stats in windows.items()],
            )
            self._conn.execute(
                "INSERT INTO monitoring_checkpoints (replica, seq) VALUES (?, ?)"
                " ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq",
                (replica, seq),
            )

    # -- labels
    def save_labels(self, rows: Sequence[LabelRow]) -> tuple[int, int]:
        new = replaced = 0
        with self._write():
            for row in rows:
                exists = self._conn.execute(
                    "SELECT 1 FROM monitoring_labels WHERE model = ? AND request_id = ?"
                    " AND row_index = ?",
                    (row.model, row.request_id, row.row_index),
                ).fetchone()
                self._conn.execute(
                    "INSERT INTO monitoring_labels (model, request_id, row_index, version,"
                    " time_us, slices, prediction, label, label_time_us)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (model, request_id, row_index) DO UPDATE SET"
                    " label = excluded.label, label_time_us = excluded.label_time_us",
                    (
                        row.model,
                        row.request_id,
                        row.row_index,
                        row.version,
                        row.time_us,
                        json.dumps(dict(row.slices), sort_keys=True),
                        row.prediction,
                        row.label,
                        row.label_time_us,
                    ),
                )
                if exists:
                    replaced += 1
                else:
                    new += 1
        return new, replaced

    # -- configuration
    def save_config(self, model: str, expected_revision: int, config: bytes) -> int:
        with self._write():
            row = self._conn.execute(
                "SELECT revision FROM monitoring_configs WHERE model = ?", (model,)
            ).fetchone()
            current = int(row[0]) if row else 0
            if current != expected_revision:
                raise revision_conflict(model, current, expected_revision)
            self._conn.execute(
                "INSERT INTO monitoring_configs (model, revision, config) VALUES (?, ?, ?)"
                " ON CONFLICT (model) DO UPDATE SET revision = excluded.revision,"
                " config = excluded.config",
                (model, current + 1, config),
            )
        return current + 1

    # -- alerts
    def save_alerts(
        self, alerts: Sequence[AlertRow], cursors: Mapping[tuple[str, str], int]
    ) -> None:
        with self._write():
            self._conn.executemany(
                "INSERT INTO monitoring_alerts (id, model, version, rule, subject, state,"
                " updated_us, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
                " updated_us = excluded.updated_us, payload = excluded.payload",
                [
                    (a.id, a.model, a.version, a.rule, a.subject, a.state, a.updated_us, a.payload)
                    for a in alerts
                ],
            )
            self._conn.executemany(
                "INSERT INTO monitoring_cursors (model, rule, window_end_us) VALUES (?, ?, ?)"
                " ON CONFLICT (model, rule) DO UPDATE SET window_end_us = excluded.window_end_us",
                [(model, rule, end) for (model, rule), end in cursors.items()],
            )

    # -- producers
    def producer_deltas(
        self, producer: str, totals: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, tuple[int, int, int]]:
        with self._write():
            return self._producer_deltas(producer, totals)

    def _producer_deltas(
        self, producer: str, totals: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, tuple[int, int, int]]:
        """Inside a write transaction."""
        deltas = {}
        for model, new in totals.items():
            row = self._conn.execute(
                "SELECT dropped, failed, requests FROM monitoring_producers"
                " WHERE producer = ? AND model = ?",
                (producer, model),
            ).fetchone()
            deltas[model] = grown(tuple(row) if row else None, new)
            self._conn.execute(
                "INSERT INTO monitoring_producers (producer, model, dropped, failed,"
                " requests) VALUES (?, ?, ?, ?, ?) ON CONFLICT (producer, model) DO UPDATE"
                " SET dropped = excluded.dropped, failed = excluded.failed,"
                " requests = excluded.requests",
                (producer, model, *new),
            )
        return deltas

    def close(self) -> None:
        with self._lock:
            self._conn.close()
