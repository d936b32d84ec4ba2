"""The embedded online store: one SQLite table per feature view, one row per entity.

Reads use one connection per thread (WAL lets them run beside the writer without
locks of ours); writes share one connection under a lock, each call one
transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelplane.kernel.errors import NotFound
from modelplane.services.feature.online_store import Row, RowsRead, WriteOutcome

# SQLite limits the number of bound parameters per statement.
_READ_CHUNK = 500
# Address space, not memory: pages are loaded on first touch, shared with other readers.
_MMAP_BYTES = 1 << 30


def _table(view: str) -> str:
    # View and feature names are checked against a strict pattern (domain.NAME_PATTERN)
    # before they get here, so quoting them is enough to use them as identifiers.
    return f'"fv_{view}"'


def _column(feature: str) -> str:
    return f'"f_{feature}"'


class SqliteOnlineStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._writer = self._connect()
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._columns: dict[str, set[str]] = {}
        self._selects: dict[tuple[str, tuple[str, ...]], str] = {}
        self._load_columns()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, check_same_thread=False, timeout=30, isolation_level=None
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        # Reads map the file instead of copying pages in with a read() call each: every
        # reader connection shares the OS page cache rather than warming its own.
        conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        return conn

    def _load_columns(self) -> None:
        tables = self._writer.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'fv\\_%' ESCAPE '\\'"
        ).fetchall()
        for (table,) in tables:
            info = self._writer.execute(f'PRAGMA table_info("{table}")').fetchall()
            self._columns[table[3:]] = {row[1][2:] for row in info if row[1].startswith("f_")}

    def ensure_view(self, view: str, features: Sequence[str]) -> None:
        with self._write_lock:
            known = self._columns.get(view)
            if known is None:
                self._writer.execute(
                    f"CREATE TABLE IF NOT EXISTS {_table(view)} ("
                    "entity_key TEXT PRIMARY KEY, event_us INTEGER NOT NULL) WITHOUT ROWID"
                )
                known = self._columns[view] = set()
            for feature in features:
                if feature not in known:
                    try:
                        self._writer.execute(
                            f"ALTER TABLE {_table(view)} ADD COLUMN {_column(feature)} BLOB"
                        )
                    except sqlite3.OperationalError as exc:
                        # Another process sharing the file added it first.
                        if "duplicate column" not in str(exc):
                            raise
                    known.add(feature)

    def _require(self, view: str, features: Sequence[str]) -> None:
        known = self._columns.get(view)
        if known is None or any(f not in known for f in features):
            raise NotFound(f"feature view {view!r} has no online storage for these features")

    def write_rows(
        self,
        view: str,
        features: Sequence[str],
        keys: Sequence[str],
        event_us: Sequence[int],
        cells: Sequence[Sequence[bytes]],
    ) -> WriteOutcome:
        self._require(view, features)
        columns = ", ".join(_column(f) for f in features)
        marks = ", ".join("?" for _ in range(len(features) + 2))
        updates = ", ".join(f"{_column(f)}=excluded.{_column(f)}" for f in features)
        table = _table(view)
        sql = (
            f"INSERT INTO {table} (entity_key, event_us, {columns}) VALUES ({marks}) "
            f"ON CONFLICT(entity_key) DO UPDATE SET event_us=excluded.event_us, {updates} "
            f"WHERE excluded.event_us >= {table}.event_us"
        )
        rows = zip(keys, event_us, *cells, strict=True)
        with self._write_lock:
            before = self._writer.total_changes
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(sql, rows)
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            written = self._writer.total_changes - before
        return WriteOutcome(written=written, ignored=len(keys) - written)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _select(self, view: str, features: Sequence[str]) -> str:
        select = self._selects.get((view, tuple(features)))
        if select is None:
            # Checked once per feature list: columns are only ever added, never dropped.
            self._require(view, features)
            wanted = ", ".join(_column(f) for f in features)
            select = f"SELECT entity_key, event_us, {wanted} FROM {_table(view)} WHERE entity_key"
            if len(self._selects) < 1024:  # bounded: one per distinct feature list
                self._selects[(view, tuple(features))] = select
        return select

    def read_row(self, view: str, features: Sequence[str], key: str) -> Row | None:
        row = self._reader().execute(self._select(view, features) + " = ?", (key,)).fetchone()
        return None if row is None else (row[1], row[2:])

    def read_rows(self, view: str, features: Sequence[str], keys: Sequence[str]) -> RowsRead:
        if len(keys) == 1:
            # One row or none, without the by-key reordering.
            row = self.read_row(view, features, keys[0])
            if row is None:
                return RowsRead(np.zeros(1, bool), np.zeros(1, np.int64), [(None,)] * len(features))
            return RowsRead(np.ones(1, bool), np.array([row[0]], np.int64), [(c,) for c in row[1]])
        conn = self._reader()
        select = self._select(view, features)
        rows = []
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _READ_CHUNK):
            chunk = unique[start : start + _READ_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows.extend(conn.execute(f"{select} IN ({marks})", chunk).fetchall())
        by_key = {row[0]: row for row in rows}
        absent = (None, 0, *([None] * len(features)))
        ordered = [by_key.get(key, absent) for key in keys]
        # Transposed in C: one tuple per column instead of a Python loop per cell.
        columns = list(zip(*ordered, strict=True)) if ordered else [()] * len(absent)
        return RowsRead(
            found=np.array([key in by_key for key in keys], dtype=bool),
            event_us=np.array(columns[1], dtype=np.int64),
            cells=columns[2:],
        )

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()
