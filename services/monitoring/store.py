"""Where prediction records live: SQLite, embedded, one file per service.

`PredictionStore` is the contract every backend keeps (a PostgreSQL one can follow):
- `append` stores batches in one transaction, all or none, and returns once committed;
  a record whose key (model name, request id, row index) is already stored is left as
  it is and counted as a duplicate (`INSERT … ON CONFLICT DO NOTHING`, portable SQL);
- reads see only committed records.

A row keeps its feature and output values as the float32 bytes that arrived, and points
at its batch's column names (one `record_schemas` row per distinct set of names).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from modelplane.services.monitoring.domain import (
    FLOAT32,
    PredictionBatch,
    StoredRecord,
    VersionRouteCount,
)

# Records of the first format (table `predictions`, no unique key) are left untouched.
SCHEMA = """
CREATE TABLE IF NOT EXISTS record_schemas (
    id INTEGER PRIMARY KEY,
    feature_names TEXT NOT NULL,
    output_names TEXT NOT NULL,
    output_widths TEXT NOT NULL,
    slice_names TEXT NOT NULL,
    UNIQUE (feature_names, output_names, output_widths, slice_names)
);
CREATE TABLE IF NOT EXISTS prediction_records (
    id INTEGER PRIMARY KEY,
    model_name TEXT NOT NULL,
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    route TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    schema_id INTEGER NOT NULL REFERENCES record_schemas (id),
    features BLOB NOT NULL,
    outputs BLOB NOT NULL,
    slices TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS prediction_records_key
    ON prediction_records (model_name, request_id, row_index);
CREATE INDEX IF NOT EXISTS prediction_records_by_model_time
    ON prediction_records (model_name, model_version, time_us);
"""

INSERT = (
    "INSERT INTO prediction_records (model_name, request_id, row_index, model_version, route,"
    " time_us, latency_ms, schema_id, features, outputs, slices)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (model_name, request_id, row_index) DO NOTHING"
)

_Schema = tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], tuple[str, ...]]


def _to_us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _from_us(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def _row_bytes(matrix: np.ndarray) -> list[bytes]:
    """Each row of a float32 matrix as its own bytes, with one copy of the whole."""
    rows, width = matrix.shape
    data = np.ascontiguousarray(matrix, dtype=FLOAT32).tobytes()
    step = width * FLOAT32.itemsize
    return [data[i * step : (i + 1) * step] for i in range(rows)]


class PredictionStore(Protocol):
    def append(self, batches: Sequence[PredictionBatch]) -> list[int]:
        """Stores the batches atomically; returns how many records of each were new."""
        ...

    def window(
        self, model_name: str, model_version: str, start: datetime | None, end: datetime | None
    ) -> tuple[list[datetime], list[float], list[VersionRouteCount]]:
        """Of the records in a window, read at one moment: the first and last times
        (empty when none), every latency, and the counts per version and route."""
        ...

    def records(self, model_name: str, model_version: str = "") -> list[StoredRecord]:
        """Every record of a model (version), oldest first."""
        ...

    def close(self) -> None: ...


class SqlitePredictionStore:
    """Blocking; callers run it off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before LogPredictions acknowledges it.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._schema_ids: dict[_Schema, int] = {}

    def _schema_id(self, schema: _Schema) -> int:
        known = self._schema_ids.get(schema)
        if known is not None:
            return known
        text = tuple(json.dumps(list(part)) for part in schema)
        self._conn.execute(
            "INSERT INTO record_schemas (feature_names, output_names, output_widths, slice_names)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            text,
        )
        (found,) = self._conn.execute(
            "SELECT id FROM record_schemas WHERE feature_names = ? AND output_names = ?"
            " AND output_widths = ? AND slice_names = ?",
            text,
        ).fetchone()
        return int(found)

    def append(self, batches: Sequence[PredictionBatch]) -> list[int]:
        stored: list[int] = []
        with self._lock:
            schemas: dict[_Schema, int] = {}
            with self._conn:  # one transaction: all or none
                for batch in batches:
                    schema = (
                        batch.feature_names,
                        batch.output_names,
                        batch.output_widths,
                        tuple(batch.slices),
                    )
                    schema_id = schemas.get(schema)
                    if schema_id is None:
                        schema_id = schemas[schema] = self._schema_id(schema)
                    cursor = self._conn.executemany(INSERT, self._rows(batch, schema_id))
                    stored.append(cursor.rowcount)
            # Cached only once committed: a rolled-back schema row does not exist.
            self._schema_ids.update(schemas)
        return stored

    @staticmethod
    def _rows(batch: PredictionBatch, schema_id: int) -> list[tuple[object, ...]]:
        rows = batch.rows
        slices: list[str | None] = [None] * rows
        if batch.slices:
            columns = list(batch.slices.values())
            slices = [json.dumps([column[i] for column in columns]) for i in range(rows)]
        return list(
            zip(
                [batch.model_name] * rows,
                batch.request_ids,
                batch.row_indices.tolist(),
                [batch.model_version] * rows,
                [batch.route] * rows,
                batch.time_us.tolist(),
                batch.latency_ms.tolist(),
                [schema_id] * rows,
                _row_bytes(batch.features),
                _row_bytes(batch.outputs),
                slices,
                strict=True,
            )
        )

    @staticmethod
    def _where(
        model_name: str, model_version: str, start: datetime | None, end: datetime | None
    ) -> tuple[str, list[object]]:
        query = " WHERE model_name = ?"
        params: list[object] = [model_name]
        if model_version:
            query += " AND model_version = ?"
            params.append(model_version)
        if start is not None:
            query += " AND time_us >= ?"
            params.append(_to_us(start))
        if end is not None:
            query += " AND time_us < ?"
            params.append(_to_us(end))
        return query, params

    def window(
        self, model_name: str, model_version: str, start: datetime | None, end: datetime | None
    ) -> tuple[list[datetime], list[float], list[VersionRouteCount]]:
        where, params = self._where(model_name, model_version, start, end)
        # Under the lock no append of this store can commit between the three reads.
        with self._lock:
            first, last = self._conn.execute(
                f"SELECT MIN(time_us), MAX(time_us) FROM prediction_records{where}", params
            ).fetchone()
            latencies = [
                lat
                for (lat,) in self._conn.execute(
                    f"SELECT latency_ms FROM prediction_records{where}", params
                )
            ]
            counts = self._conn.execute(
                f"SELECT model_version, route, COUNT(*) FROM prediction_records{where}"
                " GROUP BY model_version, route",
                params,
            ).fetchall()
        times = [] if first is None else [_from_us(first), _from_us(last)]
        return times, latencies, [VersionRouteCount(v, r, n) for v, r, n in counts]

    def records(self, model_name: str, model_version: str = "") -> list[StoredRecord]:
        where, params = self._where(model_name, model_version, None, None)
        with self._lock:
            rows = self._conn.execute(
                "SELECT model_name, model_version, route, request_id, row_index, time_us,"
                " latency_ms, features, outputs, slices, feature_names, output_names,"
                " output_widths, slice_names FROM prediction_records"
                f" JOIN record_schemas ON record_schemas.id = schema_id{where}"
                " ORDER BY time_us, prediction_records.id",
                params,
            ).fetchall()
        records = []
        for (
            name,
            version,
            route,
            request_id,
            row_index,
            time_us,
            latency,
            features,
            outputs,
            slices,
            feature_names,
            output_names,
            output_widths,
            slice_names,
        ) in rows:
            feature_values = np.frombuffer(features, FLOAT32).tolist()
            output_values = np.frombuffer(outputs, FLOAT32).tolist()
            named_outputs: dict[str, tuple[float, ...]] = {}
            offset = 0
            for output, width in zip(
                json.loads(output_names), json.loads(output_widths), strict=True
            ):
                named_outputs[output] = tuple(output_values[offset : offset + width])
                offset += width
            records.append(
                StoredRecord(
                    model_name=name,
                    model_version=version,
                    route=route,
                    request_id=request_id,
                    row_index=row_index,
                    time=_from_us(time_us),
                    latency_ms=latency,
                    features=dict(zip(json.loads(feature_names), feature_values, strict=True)),
                    outputs=named_outputs,
                    slices=dict(
                        zip(json.loads(slice_names), json.loads(slices or "[]"), strict=True)
                    ),
                )
            )
        return records

    def close(self) -> None:
        with self._lock:
            self._conn.close()
