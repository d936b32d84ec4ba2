"""Where prediction records live: SQLite, embedded, one file per service."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from modelplane.services.monitoring.domain import PredictionRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    request_id TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    features TEXT NOT NULL,
    outputs TEXT NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_by_model_time
    ON predictions (model_name, model_version, time_us);
"""


def _to_us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _from_us(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


class PredictionStore(Protocol):
    def append(self, records: Sequence[PredictionRecord]) -> int: ...

    def window(
        self, model_name: str, model_version: str, start: datetime | None, end: datetime | None
    ) -> tuple[list[datetime], list[float]]: ...

    def close(self) -> None: ...


class SqlitePredictionStore:
    """Blocking; callers run it off the event loop."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def append(self, records: Sequence[PredictionRecord]) -> int:
        rows = [
            (
                r.model_name,
                r.model_version,
                r.request_id,
                _to_us(r.time),
                json.dumps(r.features),
                json.dumps(r.outputs),
                r.latency_ms,
            )
            for r in records
        ]
        with self._lock, self._conn:  # one transaction: all or none
            self._conn.executemany(
                "INSERT INTO predictions (model_name, model_version, request_id, time_us,"
                " features, outputs, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def window(
        self, model_name: str, model_version: str, start: datetime | None, end: datetime | None
    ) -> tuple[list[datetime], list[float]]:
        query = "SELECT time_us, latency_ms FROM predictions WHERE model_name = ?"
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
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [_from_us(t) for t, _ in rows], [lat for _, lat in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
