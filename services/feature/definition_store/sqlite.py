"""Definitions in a SQLite file: the embedded default, for one feature process."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from modelplane.services.feature.definition_store import Plan, from_row, to_rows
from modelplane.services.feature.domain import Definition

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

LATEST = (
    "SELECT d.kind, d.version, d.spec FROM definitions d JOIN ("
    " SELECT kind, name, MAX(version) AS version FROM definitions"
    " GROUP BY kind, name) latest"
    " ON d.kind = latest.kind AND d.name = latest.name AND d.version = latest.version"
    " ORDER BY d.kind, d.name"
)


class SqliteDefinitionStore:
    """Small and rarely written, so one connection under a lock."""

    change_feed = None

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit, with explicit BEGIN IMMEDIATE where a read must hold the write lock.
        self._conn = sqlite3.connect(
            path, check_same_thread=False, timeout=30, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> list[Definition]:
        with self._lock:
            return self._latest()

    def _latest(self) -> list[Definition]:
        return [from_row(*row) for row in self._conn.execute(LATEST).fetchall()]

    def history(self, kind: str, name: str) -> list[Definition]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, version, spec FROM definitions WHERE kind = ? AND name = ?"
                " ORDER BY version",
                (kind, name),
            ).fetchall()
        return [from_row(*row) for row in rows]

    def save_with(self, plan: Plan) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = to_rows(plan(self._latest()))
                self._conn.executemany(
                    "INSERT INTO definitions (kind, name, version, spec, applied_at_us)"
                    " VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def watermark(self, view: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT watermark_us FROM watermarks WHERE view = ?", (view,)
            ).fetchone()
        return None if row is None else int(row[0])

    def set_watermark(self, view: str, watermark_us: int) -> None:
        """Moves the watermark forward, never back."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO watermarks (view, watermark_us) VALUES (?, ?)"
                " ON CONFLICT(view) DO UPDATE"
                " SET watermark_us = MAX(watermark_us, excluded.watermark_us)",
                (view, watermark_us),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
