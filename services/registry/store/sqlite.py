"""SQLite: the embedded default. WAL lets readers run beside the one writer; write
transactions start with BEGIN IMMEDIATE so several processes sharing the file queue
on the busy timeout instead of failing with "database is locked" half way through."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from modelplane.kernel.errors import Unavailable
from modelplane.services.registry.store.sql import SqlStore, Tx

BUSY_TIMEOUT_S = 30.0


class SqliteStore(SqlStore):
    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: transactions are begun explicitly below, so the kind of
        # lock taken (IMMEDIATE for writes) is ours to choose.
        self._conn = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # FULL: a registered version survives a power cut, not only a process crash.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()
        self.migrate()

    def _dialect(self) -> Mapping[str, str]:
        return {"id": "INTEGER PRIMARY KEY AUTOINCREMENT"}

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        with self._lock:
            cursor = self._conn.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:
                raise Unavailable(f"registry database is busy: {exc}") from exc
            try:
                yield Tx(cursor, "?")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            else:
                cursor.execute("COMMIT")
            finally:
                cursor.close()

    def _migration_transaction(self) -> AbstractContextManager[Tx]:
        return self._transaction(write=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
