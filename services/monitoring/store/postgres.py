"""The monitoring store in PostgreSQL: for several monitoring replicas sharing one
database (each its own `replica` name), psycopg 3 with a connection pool.

Sequence numbers. A batch's `seq` comes from an identity column, so it is assigned when
the row is inserted, not when its transaction commits: two transactions appending at
once may commit in the other order. Replay after a crash reads a replica's batches after
its checkpoint (`batches_after`), which is only right if that replica's numbers increase
in commit order. Hence the rule: appends of one replica are serialised — the monitoring
service does it with its ingest lock, and this store does it too with a lock of its own
(one store instance is one replica; two instances must never append under one replica
name). Different replicas interleave freely: each replays only its own batches.

Every write is one transaction of set-based statements (one `unnest` of arrays per
table, not a statement per row): `append_batches` is on the ingest path, one call per
gRPC call. Tables carry a `monitoring_` prefix: the schema may be shared with other
services' tables.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from modelplane.kernel.errors import Conflict, Unavailable
from modelplane.kernel.postgres import open_pool
from modelplane.services.monitoring.store import (
    MINUTE_US,
    AlertRow,
    LabelRow,
    NewBatch,
    StoredBatch,
    WindowKey,
)
from modelplane.services.monitoring.store.sqlite import grown

SCHEMA = """
CREATE TABLE IF NOT EXISTS monitoring_batches (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    min_time_us BIGINT NOT NULL,
    max_time_us BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    keys BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_batches_by_model ON monitoring_batches (model, seq);
CREATE INDEX IF NOT EXISTS monitoring_batches_by_replica
    ON monitoring_batches (replica, seq);
CREATE TABLE IF NOT EXISTS monitoring_windows (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    granularity_us BIGINT NOT NULL,
    start_us BIGINT NOT NULL,
    slice_key TEXT NOT NULL,
    slice_value TEXT NOT NULL,
    replica TEXT NOT NULL,
    stats BYTEA NOT NULL,
    PRIMARY KEY (model, granularity_us, slice_key, start_us, version, slice_value, replica)
);
CREATE TABLE IF NOT EXISTS monitoring_checkpoints (
    replica TEXT PRIMARY KEY,
    seq BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_references (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    reference BYTEA NOT NULL,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS monitoring_labels (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row_index BIGINT NOT NULL,
    version TEXT NOT NULL,
    time_us BIGINT NOT NULL,
    slices TEXT NOT NULL,
    prediction DOUBLE PRECISION NOT NULL,
    label DOUBLE PRECISION NOT NULL,
    label_time_us BIGINT NOT NULL,
    PRIMARY KEY (model, request_id, row_index)
);
CREATE INDEX IF NOT EXISTS monitoring_labels_by_time ON monitoring_labels (model, time_us);
CREATE TABLE IF NOT EXISTS monitoring_configs (
    model TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    config BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_alerts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    state INTEGER NOT NULL,
    updated_us BIGINT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS monitoring_alerts_by_time ON monitoring_alerts (updated_us);
CREATE TABLE IF NOT EXISTS monitoring_cursors (
    model TEXT NOT NULL,
    rule TEXT NOT NULL,
    window_end_us BIGINT NOT NULL,
    PRIMARY KEY (model, rule)
);
CREATE TABLE IF NOT EXISTS monitoring_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS monitoring_producers (
    producer TEXT NOT NULL,
    model TEXT NOT NULL,
    dropped BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    requests BIGINT NOT NULL,
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


# Any constants work: they only have to be the same for every monitoring process. The
# producer lock is the two-int4-key form (hashtext of the producer is the second key),
# a key space apart from the one-bigint form of the migration lock.
_MIGRATION_LOCK_KEY = 0x6D6F6D6F6E69
_PRODUCER_LOCK_CLASS = 0x6D6F7072

# The window key columns as `unnest` of arrays yields them (WindowKey's field order).
_WINDOW_KEYS = "unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::text[])"
_WINDOW_COLUMNS = "model, version, granularity_us, start_us, slice_key, slice_value"


def _key_arrays(keys: Sequence[WindowKey]) -> list[list[Any]]:
    return [
        [k.model for k in keys],
        [k.version for k in keys],
        [k.granularity_us for k in keys],
        [k.start_us for k in keys],
        [k.slice_key for k in keys],
        [k.slice_value for k in keys],
    ]


# The models with rows in a table, by skipping through its index (a loose index scan):
# one probe per model instead of reading every row, as DISTINCT would.
_DISTINCT_MODELS = """
WITH RECURSIVE b(model) AS (
    (SELECT model FROM monitoring_batches ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT model FROM monitoring_batches WHERE model > b.model ORDER BY model LIMIT 1)
    FROM b WHERE b.model IS NOT NULL
), w(model) AS (
    (SELECT model FROM monitoring_windows ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT model FROM monitoring_windows WHERE model > w.model ORDER BY model LIMIT 1)
    FROM w WHERE w.model IS NOT NULL
)
SELECT model FROM b WHERE model IS NOT NULL
UNION
SELECT model FROM w WHERE model IS NOT NULL
"""

_BATCH_COLUMNS = "seq, replica, model, version, payload, keys"


def _stored_batch(row: tuple[Any, ...]) -> StoredBatch:
    seq, replica, model, version, payload, keys = row
    return StoredBatch(int(seq), replica, model, version, bytes(payload), bytes(keys))


class PostgresMonitoringStore:
    def __init__(
        self,
        url: str,
        schema: str = "",
        max_connections: int = 4,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._pool = open_pool(url, schema, 1, max_connections, connect_timeout_s)
        # See the module docstring: one replica's appends commit in sequence order.
        self._append_lock = threading.Lock()
        try:
            with self._transaction() as cursor:
                # Replicas starting together create the tables once.
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
                cursor.execute(SCHEMA)
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
                yield cursor
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable(f"PostgreSQL unavailable: {exc.sqlstate or 'connection'}") from exc

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
        if not batches and not totals:
            return [], {}
        with self._append_lock, self._transaction() as cursor:
            deltas = self._producer_deltas(cursor, producer, totals) if totals else {}
            if not batches:
                return [], deltas
            # Identity values follow the order rows are inserted, which ORDER BY fixes
            # to the batches' order, so the returned numbers sorted are theirs in order.
            cursor.execute(
                "INSERT INTO monitoring_batches (replica, model, version, min_time_us,"
                " max_time_us, rows, payload, keys)"
                " SELECT %s, model, version, min_time_us, max_time_us, rows, payload, keys"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
                " %s::bigint[], %b::bytea[], %b::bytea[]) WITH ORDINALITY"
                " AS b(model, version, min_time_us, max_time_us, rows, payload, keys, i)"
                " ORDER BY i RETURNING seq",
                (
                    replica,
                    [b.model for b in batches],
                    [b.version for b in batches],
                    [b.min_time_us for b in batches],
                    [b.max_time_us for b in batches],
                    [b.rows for b in batches],
                    [b.payload for b in batches],
                    [b.keys for b in batches],
                ),
            )
            seqs = sorted(int(row[0]) for row in cursor.fetchall())
        return seqs, deltas

    def batches(self, seqs: Sequence[int]) -> dict[int, StoredBatch]:
        if not seqs:
            return {}
        with self._transaction() as cursor:
            rows = cursor.execute(
                f"SELECT {_BATCH_COLUMNS} FROM monitoring_batches WHERE seq = ANY(%s::bigint[])",
                (sorted(set(seqs)),),
            ).fetchall()
        return {int(row[0]): _stored_batch(row) for row in rows}

    def batches_after(self, replica: str, seq: int, limit: int) -> list[StoredBatch]:
        with self._transaction() as cursor:
            rows = cursor.execute(
                f"SELECT {_BATCH_COLUMNS} FROM monitoring_batches"
                " WHERE replica = %s AND seq > %s ORDER BY seq LIMIT %s",
                (replica, seq, limit),
            ).fetchall()
        return [_stored_batch(row) for row in rows]

    def recent_keys(self, model: str, max_keys: int) -> Iterator[tuple[int, bytes]]:
        # A page per transaction: no connection is held while the caller consumes.
        seen = 0
        last: int | None = None
        while seen < max_keys:
            with self._transaction() as cursor:
                if last is None:
                    cursor.execute(
                        "SELECT seq, keys FROM monitoring_batches WHERE model = %s"
                        " ORDER BY seq DESC LIMIT 256",
                        (model,),
                    )
                else:
                    cursor.execute(
                        "SELECT seq, keys FROM monitoring_batches WHERE model = %s"
                        " AND seq < %s ORDER BY seq DESC LIMIT 256",
                        (model, last),
                    )
                rows = cursor.fetchall()
            if not rows:
                return
            for seq, keys in rows:
                yield int(seq), bytes(keys)
                seen += len(keys) // 8
                last = int(seq)
                if seen >= max_keys:
                    return

    def models(self) -> list[str]:
        with self._transaction() as cursor:
            rows = cursor.execute(_DISTINCT_MODELS).fetchall()
        return sorted(row[0] for row in rows)

    # -- window statistics
    def windows(self, replica: str, keys: Sequence[WindowKey]) -> dict[WindowKey, bytes]:
        if not keys:
            return {}
        keys = list(keys)
        with self._transaction() as cursor:
            rows = cursor.execute(
                f"SELECT k.i, w.stats FROM {_WINDOW_KEYS} WITH ORDINALITY"
                f" AS k({_WINDOW_COLUMNS}, i)"
                " JOIN monitoring_windows w ON w.model = k.model AND w.version = k.version"
                " AND w.granularity_us = k.granularity_us AND w.start_us = k.start_us"
                " AND w.slice_key = k.slice_key AND w.slice_value = k.slice_value"
                " AND w.replica = %s",
                (*_key_arrays(keys), replica),
            ).fetchall()
        return {keys[int(i) - 1]: bytes(stats) for i, stats in rows}

    def save_windows(self, replica: str, seq: int, windows: Mapping[WindowKey, bytes]) -> None:
        # In key order, so that no two transactions upsert shared rows in opposite orders.
        keys = sorted(windows)
        with self._transaction() as cursor:
            if keys:
                cursor.execute(
                    f"INSERT INTO monitoring_windows ({_WINDOW_COLUMNS}, replica, stats)"
                    f" SELECT {_WINDOW_COLUMNS}, %s, stats"
                    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
                    " %s::text[], %s::text[], %b::bytea[]) WITH ORDINALITY"
                    f" AS w({_WINDOW_COLUMNS}, stats, i) ORDER BY i"
                    " ON CONFLICT (model, granularity_us, slice_key, start_us, version,"
                    " slice_value, replica) DO UPDATE SET stats = excluded.stats",
                    (replica, *_key_arrays(keys), [windows[k] for k in keys]),
                )
            cursor.execute(
                "INSERT INTO monitoring_checkpoints (replica, seq) VALUES (%s, %s)"
                " ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq",
                (replica, seq),
            )

    def checkpoint(self, replica: str) -> int:
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT seq FROM monitoring_checkpoints WHERE replica = %s", (replica,)
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
            f"SELECT {_WINDOW_COLUMNS}, stats FROM monitoring_windows"
            " WHERE model = %s AND granularity_us = %s AND start_us >= %s AND start_us < %s"
        )
        params: list[object] = [model, granularity_us, start_us, end_us]
        if slice_key is not None:
            query += " AND slice_key = %s"
            params.append(slice_key)
        if version:
            query += " AND version = %s"
            params.append(version)
        with self._transaction() as cursor:
            rows = cursor.execute(query, params).fetchall()
        return [
            (WindowKey(m, v, int(g), int(s), sk, sv), bytes(stats))
            for m, v, g, s, sk, sv, stats in rows
        ]

    # -- references
    def reference(self, model: str, version: str) -> bytes | None:
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT reference FROM monitoring_references WHERE model = %s AND version = %s",
                (model, version),
            ).fetchone()
        return bytes(row[0]) if row else None

    def save_reference(self, model: str, version: str, reference: bytes) -> bytes:
        with self._transaction() as cursor:
            # Under a race the INSERT waits for the other writer's commit and does
            # nothing; the SELECT, a statement of its own (its own snapshot in READ
            # COMMITTED), then sees the winner's row.
            cursor.execute(
                "INSERT INTO monitoring_references (model, version, reference)"
                " VALUES (%s, %s, %s) ON CONFLICT (model, version) DO NOTHING",
                (model, version, reference),
            )
            row = cursor.execute(
                "SELECT reference FROM monitoring_references WHERE model = %s AND version = %s",
                (model, version),
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    # -- labels
    def save_labels(self, rows: Sequence[LabelRow]) -> tuple[int, int]:
        if not rows:
            return 0, 0
        # One statement cannot upsert a row twice: a key given twice is merged first, as
        # applying them one after the other would (the first row, the last label).
        merged: dict[tuple[str, str, int], LabelRow] = {}
        for row in rows:
            key = (row.model, row.request_id, row.row_index)
            first = merged.get(key)
            merged[key] = (
                row
                if first is None
                else replace(first, label=row.label, label_time_us=row.label_time_us)
            )
        unique = [merged[key] for key in sorted(merged)]  # key order: no deadlocks
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO monitoring_labels (model, request_id, row_index, version,"
                " time_us, slices, prediction, label, label_time_us)"
                " SELECT model, request_id, row_index, version, time_us, slices, prediction,"
                " label, label_time_us FROM unnest(%s::text[], %s::text[], %s::bigint[],"
                " %s::text[], %s::bigint[], %s::text[], %s::float8[], %s::float8[],"
                " %s::bigint[]) WITH ORDINALITY AS l(model, request_id, row_index, version,"
                " time_us, slices, prediction, label, label_time_us, i) ORDER BY i"
                " ON CONFLICT (model, request_id, row_index) DO UPDATE SET"
                " label = excluded.label, label_time_us = excluded.label_time_us"
                # xmax is 0 on a row this statement inserted, a transaction id on one
                # it updated.
                " RETURNING (xmax = 0)",
                (
                    [r.model for r in unique],
                    [r.request_id for r in unique],
                    [r.row_index for r in unique],
                    [r.version for r in unique],
                    [r.time_us for r in unique],
                    [json.dumps(dict(r.slices), sort_keys=True) for r in unique],
                    [float(r.prediction) for r in unique],
                    [float(r.label) for r in unique],
                    [r.label_time_us for r in unique],
                ),
            )
            new = sum(1 for (inserted,) in cursor.fetchall() if inserted)
        return new, len(rows) - new

    def labels(self, model: str, version: str, start_us: int, end_us: int) -> list[LabelRow]:
        query = (
            "SELECT model, request_id, row_index, version, time_us, slices, prediction,"
            " label, label_time_us FROM monitoring_labels WHERE model = %s"
            " AND time_us >= %s AND time_us < %s"
        )
        params: list[object] = [model, start_us, end_us]
        if version:
            query += " AND version = %s"
            params.append(version)
        with self._transaction() as cursor:
            rows = cursor.execute(query, params).fetchall()
        return [
            LabelRow(m, r, int(i), v, int(t), json.loads(s), p, lab, int(lt))
            for m, r, i, v, t, s, p, lab, lt in rows
        ]

    # -- configuration
    def config(self, model: str) -> tuple[bytes, int] | None:
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT config, revision FROM monitoring_configs WHERE model = %s", (model,)
            ).fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    def save_config(self, model: str, expected_revision: int, config: bytes) -> int:
        with self._transaction() as cursor:
            # Each is one conditional statement: a concurrent writer's commit makes the
            # INSERT conflict or the UPDATE's re-checked revision differ, so of several
            # writers expecting one revision exactly one succeeds.
            if expected_revision == 0:
                row = cursor.execute(
                    "INSERT INTO monitoring_configs (model, revision, config)"
                    " VALUES (%s, 1, %s) ON CONFLICT (model) DO NOTHING RETURNING revision",
                    (model, config),
                ).fetchone()
            else:
                row = cursor.execute(
                    "UPDATE monitoring_configs SET revision = revision + 1, config = %s"
                    " WHERE model = %s AND revision = %s RETURNING revision",
                    (config, model, expected_revision),
                ).fetchone()
            if row is not None:
                return int(row[0])
            current = cursor.execute(
                "SELECT revision FROM monitoring_configs WHERE model = %s", (model,)
            ).fetchone()
        raise Conflict(
            f"monitor config of '{model[:64]}' is at revision {int(current[0]) if current else 0},"
            f" not {expected_revision}: read it again and retry"
        )

    def configs(self) -> list[tuple[str, bytes]]:
        with self._transaction() as cursor:
            rows = cursor.execute("SELECT model, config FROM monitoring_configs").fetchall()
        return [(m, bytes(c)) for m, c in rows]

    # -- alerts
    def save_alerts(
        self, alerts: Sequence[AlertRow], cursors: Mapping[tuple[str, str], int]
    ) -> None:
        if not alerts and not cursors:
            return
        # An id given twice is merged first, as upserting them in turn would.
        merged: dict[str, AlertRow] = {}
        for alert in alerts:
            first = merged.get(alert.id)
            merged[alert.id] = (
                alert
                if first is None
                else replace(
                    first, state=alert.state, updated_us=alert.updated_us, payload=alert.payload
                )
            )
        unique = [merged[i] for i in sorted(merged)]
        rules = sorted(cursors)
        with self._transaction() as cursor:
            if unique:
                cursor.execute(
                    "INSERT INTO monitoring_alerts (id, model, version, rule, subject, state,"
                    " updated_us, payload) SELECT id, model, version, rule, subject, state,"
                    " updated_us, payload FROM unnest(%s::text[], %s::text[], %s::text[],"
                    " %s::text[], %s::text[], %s::int[], %s::bigint[], %b::bytea[])"
                    " WITH ORDINALITY AS a(id, model, version, rule, subject, state,"
                    " updated_us, payload, i) ORDER BY i"
                    " ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
                    " updated_us = excluded.updated_us, payload = excluded.payload",
                    (
                        [a.id for a in unique],
                        [a.model for a in unique],
                        [a.version for a in unique],
                        [a.rule for a in unique],
                        [a.subject for a in unique],
                        [a.state for a in unique],
                        [a.updated_us for a in unique],
                        [a.payload for a in unique],
                    ),
                )
            if rules:
                cursor.execute(
                    "INSERT INTO monitoring_cursors (model, rule, window_end_us)"
                    " SELECT model, rule, window_end_us FROM unnest(%s::text[], %s::text[],"
                    " %s::bigint[]) WITH ORDINALITY AS c(model, rule, window_end_us, i)"
                    " ORDER BY i ON CONFLICT (model, rule) DO UPDATE"
                    " SET window_end_us = excluded.window_end_us",
                    (
                        [m for m, _ in rules],
                        [r for _, r in rules],
                        [cursors[key] for key in rules],
                    ),
                )

    def alerts(self, model: str, states: Sequence[int], limit: int) -> list[AlertRow]:
        query = (
            "SELECT id, model, version, rule, subject, state, updated_us, payload"
            " FROM monitoring_alerts WHERE true"
        )
        params: list[object] = []
        if model:
            query += " AND model = %s"
            params.append(model)
        if states:
            query += " AND state = ANY(%s::int[])"
            params.append(list(states))
        # Ties in byte order, as SQLite breaks them, whatever the database's collation.
        query += ' ORDER BY updated_us DESC, id COLLATE "C" LIMIT %s'
        params.append(limit)
        with self._transaction() as cursor:
            rows = cursor.execute(query, params).fetchall()
        return [
            AlertRow(i, m, v, r, s, int(st), int(u), bytes(p)) for i, m, v, r, s, st, u, p in rows
        ]

    def cursor(self, model: str, rule: str) -> int:
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT window_end_us FROM monitoring_cursors WHERE model = %s AND rule = %s",
                (model, rule),
            ).fetchone()
        return int(row[0]) if row else 0

    # -- producers
    def producer_deltas(
        self, producer: str, totals: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, tuple[int, int, int]]:
        if not totals:
            return {}
        with self._transaction() as cursor:
            return self._producer_deltas(cursor, producer, totals)

    @staticmethod
    def _producer_deltas(
        cursor: psycopg.Cursor[Any], producer: str, totals: Mapping[str, tuple[int, int, int]]
    ) -> dict[str, tuple[int, int, int]]:
        """Inside a transaction."""
        models = sorted(totals)
        # Reports of one producer (arriving at two replicas at once, say) queue
        # here, so each growth is counted once; row locks could not cover the
        # first report of a model, whose row does not exist yet.
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))",
            (_PRODUCER_LOCK_CLASS, producer),
        )
        stored = {
            model: (int(d), int(f), int(r))
            for model, d, f, r in cursor.execute(
                "SELECT model, dropped, failed, requests FROM monitoring_producers"
                " WHERE producer = %s AND model = ANY(%s::text[])",
                (producer, models),
            )
        }
        cursor.execute(
            "INSERT INTO monitoring_producers (producer, model, dropped, failed, requests)"
            " SELECT %s, model, dropped, failed, requests FROM unnest(%s::text[],"
            " %s::bigint[], %s::bigint[], %s::bigint[])"
            " AS p(model, dropped, failed, requests)"
            " ON CONFLICT (producer, model) DO UPDATE SET dropped = excluded.dropped,"
            " failed = excluded.failed, requests = excluded.requests",
            (
                producer,
                models,
                [totals[m][0] for m in models],
                [totals[m][1] for m in models],
                [totals[m][2] for m in models],
            ),
        )
        return {model: grown(stored.get(model), totals[model]) for model in models}

    # -- leases
    def lease(self, name: str, holder: str, now_us: int, ttl_us: int) -> bool:
        with self._transaction() as cursor:
            cursor.execute(LEASE.format(p="%s"), (name, holder, now_us + ttl_us, now_us))
            cursor.execute("SELECT holder FROM monitoring_leases WHERE name = %s", (name,))
            row = cursor.fetchone()
        return row is not None and row[0] == holder

    # -- retention
    def prune(self, before_us: int) -> int:
        with self._transaction() as cursor:
            cursor.execute("DELETE FROM monitoring_batches WHERE max_time_us < %s", (before_us,))
            deleted = cursor.rowcount
            cursor.execute(
                "DELETE FROM monitoring_windows WHERE granularity_us = %s AND start_us < %s",
                (MINUTE_US, before_us - MINUTE_US),
            )
            cursor.execute("DELETE FROM monitoring_labels WHERE time_us < %s", (before_us,))
        return int(deleted)

    def close(self) -> None:
        self._pool.close()
