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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import psycopg

from modelplane.kernel.postgres import open_pool_with_tables, transaction
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
    WINDOW_COLUMNS,
    SqlMonitoringStore,
    Tx,
    grown,
    revision_conflict,
    stored_batch,
)

SCHEMA = (
    sql.SCHEMA.format(
        seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        int="BIGINT",
        bytes="BYTEA",
        float="DOUBLE PRECISION",
    )
    # Only here do replicas share the table: each replays its own (`batches_after`).
    + "CREATE INDEX IF NOT EXISTS monitoring_batches_by_replica"
    " ON monitoring_batches (replica, seq);\n"
)

# Any constants work: they only have to be the same for every monitoring process. The
# producer lock is the two-int4-key form (hashtext of the producer is the second key),
# a key space apart from the one-bigint form of the migration lock.
_MIGRATION_LOCK_KEY = 0x6D6F6D6F6E69
_PRODUCER_LOCK_CLASS = 0x6D6F7072

# The window key columns as `unnest` of arrays yields them (WindowKey's field order).
_WINDOW_KEYS = "unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::text[])"


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


_Row = TypeVar("_Row", LabelRow, AlertRow)


def _one_per_key(
    rows: Sequence[_Row], key: Callable[[_Row], Any], later: Sequence[str]
) -> list[_Row]:
    """One statement cannot upsert a row twice: rows with one key are merged first, as
    upserting them in turn would (the first row, with the `later` fields of the last).
    In key order, so that no two transactions lock shared rows in opposite orders."""
    merged: dict[Any, _Row] = {}
    for row in rows:
        first = merged.get(key(row))
        merged[key(row)] = (
            row if first is None else replace(first, **{f: getattr(row, f) for f in later})
        )
    return [merged[k] for k in sorted(merged)]


class PostgresMonitoringStore(SqlMonitoringStore):
    # Ties in byte order, as SQLite breaks them, whatever the database's collation.
    _ID_ORDER = 'id COLLATE "C"'

    def __init__(
        self,
        url: str,
        schema: str = "",
        max_connections: int = 4,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._pool = open_pool_with_tables(
            url, schema, max_connections, connect_timeout_s, SCHEMA, _MIGRATION_LOCK_KEY
        )
        # See the module docstring: one replica's appends commit in sequence order.
        self._append_lock = threading.Lock()

    def _transaction(self) -> AbstractContextManager[psycopg.Cursor[Any]]:
        return transaction(self._pool)

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Tx]:
        with self._transaction() as cursor:
            yield Tx(cursor, "%s")

    def _state_filter(self, states: Sequence[int]) -> tuple[str, list[object]]:
        # One array parameter: the statement's text is the same for any number of states.
        return "state = ANY(?::int[])", [list(states)]

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
                f"SELECT {BATCH_COLUMNS} FROM monitoring_batches WHERE seq = ANY(%s::bigint[])",
                (sorted(set(seqs)),),
            ).fetchall()
        return {int(row[0]): stored_batch(row) for row in rows}

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
                f" AS k({WINDOW_COLUMNS}, i)"
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
                    f"INSERT INTO monitoring_windows ({WINDOW_COLUMNS}, replica, stats)"
                    f" SELECT {WINDOW_COLUMNS}, %s, stats"
                    " FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
                    " %s::text[], %s::text[], %b::bytea[]) WITH ORDINALITY"
                    f" AS w({WINDOW_COLUMNS}, stats, i) ORDER BY i"
                    " ON CONFLICT (model, granularity_us, slice_key, start_us, version,"
                    " slice_value, replica) DO UPDATE SET stats = excluded.stats",
                    (replica, *_key_arrays(keys), [windows[k] for k in keys]),
                )
            cursor.execute(
                "INSERT INTO monitoring_checkpoints (replica, seq) VALUES (%s, %s)"
                " ON CONFLICT (replica) DO UPDATE SET seq = excluded.seq",
                (replica, seq),
            )

    # -- labels
    def save_labels(self, rows: Sequence[LabelRow]) -> tuple[int, int]:
        if not rows:
            return 0, 0
        unique = _one_per_key(
            rows, lambda r: (r.model, r.request_id, r.row_index), ("label", "label_time_us")
        )
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

    # -- configuration
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
        raise revision_conflict(model, int(current[0]) if current else 0, expected_revision)

    # -- alerts
    def save_alerts(
        self, alerts: Sequence[AlertRow], cursors: Mapping[tuple[str, str], int]
    ) -> None:
        if not alerts and not cursors:
            return
        unique = _one_per_key(alerts, lambda a: a.id, ("state", "updated_us", "payload"))
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

    def close(self) -> None:
        self._pool.close()
