"""Every version of every definition, and each view's materialization watermark, in SQLite."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from modelplane.services.feature.definitions import from_spec, to_spec
from modelplane.services.feature.domain import Definition, kind_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    applied_at_us INTEGER NOT NULL,
    PRIMARY KEY (kind, name, version)
);
CREATE TABLE IF NOT EXISTS watermarks (
    view TEXT PRIMARY KEY,
    watermark_us INTEGER NOT NULL
);
"""


class SqliteDefinitionStore:
    """Blocking; small and rarely written, so one connection under a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> list[Definition]:
        """The latest version of each definition."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT d.kind, d.version, d.spec FROM definitions d JOIN ("
                " SELECT kind, name, MAX(version) AS version FROM definitions"
                " GROUP BY kind, name) latest"
                " ON d.kind = latest.kind AND d.name = latest.name AND d.version = latest.version"
                " ORDER BY d.kind, d.name"
            ).fetchall()
        return [from_spec(kind, json.loads(spec), version) for kind, version, spec in rows]

    def history(self, kind: str, name: str) -> list[Definition]:
        """Every stored version of one definition, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT version, spec FROM definitions WHERE kind = ? AND name = ?"
                " ORDER BY version",
                (kind, name),
            ).fetchall()
        return [from_spec(kind, json.loads(spec), version) for version, spec in rows]

    def save(self, definitions: Sequence[Definition]) -> None:
        now = int(time.time() * 1_000_000)
        rows = [
            (kind_of(d), d.name, d.version, json.dumps(to_spec(d), sort_keys=True), now)
            for d in definitions
        ]
        with self._lock, self._conn:  # one transaction: a whole apply or nothing
            self._conn.executemany(
                "INSERT INTO definitions (kind, name, version, spec, applied_at_us)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def watermark(self, view: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT watermark_us FROM watermarks WHERE view = ?", (view,)
            ).fetchone()
        return None if row is None else int(row[0])

    def set_watermark(self, view: str, watermark_us: int) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO watermarks (view, watermark_us) VALUES (?, ?)"
                " ON CONFLICT(view) DO UPDATE SET watermark_us = excluded.watermark_us",
                (view, watermark_us),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
