"""The monitoring store in one SQLite file: the default, for one monitoring process."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from modelplane.kernel.errors import Conflict
from modelplane.services.monitoring.store import (
    MINUTE_US,
    AlertRow,
    LabelRow,
    NewBatch,
    StoredBatch,
    WindowKey,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS monitoring_batches (
    -- AUTOINCREMENT: a number is never reused, even after the newest batches are pruned
    -- (checkpoints and the record-key index refer to batches by number).
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    min_time_us INTEGER NOT NULL,
    max_time_us INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    payload BLOB NOT NULL,
    keys BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_batches_by_model ON monitoring_batches (model, seq);
CREATE TABLE IF NOT EXISTS monitoring_windows (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    granularity_us INTEGER NOT NULL,
    start_us INTEGER NOT NULL,
    slice_key TEXT NOT NULL,
    slice_value TEXT NOT NULL,
    replica TEXT NOT NULL,
    stats BLOB NOT NULL,
    PRIMARY KEY (model, granularity_us, slice_key, start_us, version, slice_value, replica)
);
CREATE TABLE IF NOT EXISTS monitoring_checkpoints (
    replica TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_references (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    reference BLOB NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS monitoring_labels (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    version TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    slices TEXT NOT NULL,
    prediction REAL NOT NULL,
    label REAL NOT NULL,
    label_time_us INTEGER NOT NULL,
    PRIMARY KEY (model, request_id, row_index)
);
CREATE INDEX IF NOT EXISTS monitoring_labels_by_time ON monitoring_labels (model, time_us);
CREATE TABLE IF NOT EXISTS monitoring_configs (
    model TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    config BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_alerts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    state INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_alerts_by_time ON monitoring_alerts (updated_us);
CREATE TABLE IF NOT EXISTS monitoring_cursors (
    model TEXT NOT NULL,
    rule TEXT NOT NULL,
    window_end_us INTEGER NOT NULL,
    PRIMARY KEY (model, rule)
);
CREATE TABLE IF NOT EXISTS monitoring_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_producers (
    producer TEXT NOT NULL,
    model TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (producer, model)
);
"""


# Takes the lease when free, expired or already ours; the holder reads it back.
LEASE = (
    "INSERT INTO monitoring_leases (name, holder, expires_us) VALUES ({p}, {p}, {p})"
    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
    " expires_us = excluded.expires_us"
    " WHERE monitoring_leases.holder = excluded.holder OR monitoring_leases.expires_us < {p}"
)


def grown(old: tuple[int, int, int] | None, new: tuple[int, int, int]) -> tuple[int, int, int]:
    """What running totals grew by; a total below the stored one means the producer
    restarted and counts from zero, so it counts whole."""
    if old is None:
        return new
    return tuple(n - o if n >= o else n for o, n in zip(old, new, strict=True))  # type: ignore[return-value]


class SqliteMonitoringStore:
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

    _BATCH_COLUMNS = "seq, replica, model, version, payload, keys"

    def batches(self, seqs: Sequence[int]) -> dict[int, StoredBatch]:
        found: dict[int, StoredBatch] = {}
        unique = sorted(set(seqs))
        with self._lock:
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                rows = self._conn.execute(
                    f"SELECT {self._BATCH_COLUMNS} FROM monitoring_batches"
                    f" WHERE seq IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                found.update((row[0], StoredBatch(*row)) for row in rows)
        return found

    def batches_after(self, replica: str, seq: int, limit: int) -> list[StoredBatch]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._BATCH_COLUMNS} FROM monitoring_batches"
                " WHERE replica = ? AND seq > ? ORDER BY seq LIMIT ?",
                (replica, seq, limit),
            ).fetchall()
        return [StoredBatch(*row) for row in rows]

    def recent_keys(self, model: str, max_keys: int) -> Iterator[tuple[int, bytes]]:
        seen = 0
        last = None
        while seen < max_keys:
            with self._lock:
                query = "SELECT seq, keys FROM monitoring_batches WHERE model = ?"
                params: list[object] = [model]
                if last is not None:
                    query += " AND seq < ?"
                    params.append(last)
                rows = self._conn.execute(query + " ORDER BY seq DESC LIMIT 256", params).fetchall()
            if not rows:
                return
            for seq, keys in rows:
                yield seq, keys
                seen += len(keys) // 8
                last = seq
                if seen >= max_keys:
                    return

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

    def checkpoint(self, replica: str) -> int:
        with self._lock:
            row = self._conn.execute(
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
            "SELECT model, version, granularity_us, start_us, slice_key, slice_value, stats"
            " FROM monitoring_windows WHERE model = ? AND granularity_us = ?"
            " AND start_us >= ? AND start_us < ?"
        )
        params: list[object] = [model, granularity_us, start_us, end_us]
        if slice_key is not None:
            query += " AND slice_key = ?"
            params.append(slice_key)
        if version:
            query += " AND version = ?"
            params.append(version)
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [(WindowKey(*row[:6]), row[6]) for row in rows]

    # -- references
    def reference(self, model: str, version: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT reference FROM monitoring_references WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
        return row[0] if row else None

    def save_reference(self, model: str, version: str, reference: bytes) -> bytes:
        with self._write():
            self._conn.execute(
                "INSERT INTO monitoring_references (model, version, reference) VALUES (?, ?, ?)"
                " ON CONFLICT (model, version) DO NOTHING",
                (model, version, reference),
            )
            (stored,) = self._conn.execute(
                "SELECT reference FROM monitoring_references WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
        return bytes(stored)

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

    def labels(self, model: str, version: str, start_us: int, end_us: int) -> list[LabelRow]:
        query = (
            "SELECT model, request_id, row_index, version, time_us, slices, prediction, label,"
            " label_time_us FROM monitoring_labels WHERE model = ? AND time_us >= ?"
            " AND time_us < ?"
        )
        params: list[object] = [model, start_us, end_us]
        if version:
            query += " AND version = ?"
            params.append(version)
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [
            LabelRow(m, r, i, v, t, json.loads(s), p, lab, lt)
            for m, r, i, v, t, s, p, lab, lt in rows
        ]

    # -- configuration
    def config(self, model: str) -> tuple[bytes, int] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT config, revision FROM monitoring_configs WHERE model = ?", (model,)
            ).fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    def save_config(self, model: str, expected_revision: int, config: bytes) -> int:
        with self._write():
            row = self._conn.execute(
                "SELECT revision FROM monitoring_configs WHERE model = ?", (model,)
            ).fetchone()
            current = int(row[0]) if row else 0
            if current != expected_revision:
                raise Conflict(
                    f"monitor config of '{model[:64]}' is at revision {current},"
                    f" not {expected_revision}: read it again and retry"
                )
            self._conn.execute(
                "INSERT INTO monitoring_configs (model, revision, config) VALUES (?, ?, ?)"
                " ON CONFLICT (model) DO UPDATE SET revision = excluded.revision,"
                " config = excluded.config",
                (model, current + 1, config),
            )
        return current + 1

    def configs(self) -> list[tuple[str, bytes]]:
        with self._lock:
            rows = self._conn.execute("SELECT model, config FROM monitoring_configs").fetchall()
        return [(m, bytes(c)) for m, c in rows]

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

    def alerts(self, model: str, states: Sequence[int], limit: int) -> list[AlertRow]:
        query = (
            "SELECT id, model, version, rule, subject, state, updated_us, payload"
            " FROM monitoring_alerts WHERE 1 = 1"
        )
        params: list[object] = []
        if model:
            query += " AND model = ?"
            params.append(model)
        if states:
            query += f" AND state IN ({','.join('?' * len(states))})"
            params.extend(states)
        query += " ORDER BY updated_us DESC, id LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [
            AlertRow(i, m, v, r, s, int(st), int(u), bytes(p)) for i, m, v, r, s, st, u, p in rows
        ]

    def cursor(self, model: str, rule: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT window_end_us FROM monitoring_cursors WHERE model = ? AND rule = ?",
                (model, rule),
            ).fetchone()
        return int(row[0]) if row else 0

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

    # -- leases
    def lease(self, name: str, holder: str, now_us: int, ttl_us: int) -> bool:
        with self._write():
            self._conn.execute(LEASE.format(p="?"), (name, holder, now_us + ttl_us, now_us))
            (current,) = self._conn.execute(
                "SELECT holder FROM monitoring_leases WHERE name = ?", (name,)
            ).fetchone()
        return bool(current == holder)

    # -- retention
    def prune(self, before_us: int) -> int:
        with self._write():
            deleted = self._conn.execute(
                "DELETE FROM monitoring_batches WHERE max_time_us < ?", (before_us,)
            ).rowcount
            self._conn.execute(
                "DELETE FROM monitoring_windows WHERE granularity_us = ? AND start_us < ?",
                (MINUTE_US, before_us - MINUTE_US),
            )
            self._conn.execute("DELETE FROM monitoring_labels WHERE time_us < ?", (before_us,))
        return int(deleted)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
