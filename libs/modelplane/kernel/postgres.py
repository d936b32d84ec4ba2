"""PostgreSQL plumbing the services share: a connection pool on a schema of their own,
transactions that turn an unreachable server into Unavailable, and a LISTEN feed through
which replicas sharing one database hear each other's commits."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from modelplane.kernel.errors import InvalidArgument, Unavailable

log = logging.getLogger("modelplane.postgres")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def open_pool(
    url: str, schema: str, min_connections: int, max_connections: int, connect_timeout_s: float
) -> ConnectionPool:
    """A pool whose connections use `schema` (created if missing; empty = search_path);
    an unreachable server is Unavailable after `connect_timeout_s`, not a hang."""
    kwargs: dict[str, object] = {}
    if schema:
        if not _SCHEMA_NAME.match(schema):
            raise InvalidArgument(f"schema {schema!r} must be a lowercase SQL identifier")
        kwargs["options"] = f"-c search_path={schema}"
    pool: ConnectionPool = ConnectionPool(
        url,
        min_size=min_connections,
        max_size=max_connections,
        kwargs=kwargs,
        timeout=connect_timeout_s,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=connect_timeout_s)
    except PoolTimeout as exc:
        pool.close()
        raise Unavailable(f"cannot connect to PostgreSQL within {connect_timeout_s}s") from exc
    if schema:
        with pool.connection() as conn:
            try:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                )
            except psycopg.errors.UniqueViolation:
                # IF NOT EXISTS is not atomic: a replica starting at the same moment
                # created it first, which is what we wanted.
                conn.rollback()
    return pool


@contextmanager
def transaction(pool: ConnectionPool) -> Iterator[psycopg.Cursor[Any]]:
    """A cursor in one transaction on a pooled connection (committed when the block ends,
    rolled back when it raises); no free connection or a lost server is Unavailable."""
    try:
        with pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield cursor
    except PoolTimeout as exc:
        raise Unavailable("no PostgreSQL connection available") from exc
    except psycopg.OperationalError as exc:
        raise Unavailable(f"PostgreSQL unavailable: {exc.sqlstate or 'connection'}") from exc


def open_pool_with_tables(
    url: str,
    schema: str,
    max_connections: int,
    connect_timeout_s: float,
    tables: str,
    lock_key: int,
) -> ConnectionPool:
    """`open_pool` (one connection kept open), then `tables` (CREATE ... IF NOT EXISTS
    statements) run under the advisory lock `lock_key`: replicas starting together
    create the tables once. The pool is closed again if that fails."""
    pool = open_pool(url, schema, 1, max_connections, connect_timeout_s)
    try:
        with transaction(pool) as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
            cursor.execute(tables)
    except BaseException:
        pool.close()
        raise
    return pool


def channel_name(prefix: str, schema: str) -> str:
    """One NOTIFY channel per schema, so processes on separate schemas do not hear each other."""
    return prefix + hashlib.sha256(schema.encode()).hexdigest()[:16]


class PostgresChangeListener:
    """Hears the changes every process sharing the database commits on `channel`. After a
    lost connection it reconnects and reports a gap: changes committed meanwhile were not
    heard, so whoever relies on them must start over from a snapshot."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_change: Callable[[dict[str, object]], None],
        on_gap: Callable[[], None],
        name: str,
        retry_s: float = 1.0,
    ) -> None:
        self._url = url
        self._channel = channel
        self._on_change = on_change
        self._on_gap = on_gap
        self._name = name
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-listen", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._listening.wait(timeout):
            self.stop()
            raise Unavailable(f"cannot LISTEN on PostgreSQL within {timeout}s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        heard_before = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    if heard_before:
                        self._call(self._on_gap)
                    heard_before = True
                    self._listening.set()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            self._call(self._on_change, json.loads(notify.payload))
            except psycopg.Error as exc:
                log.warning(
                    "%s change feed lost (%s); reconnecting", self._name, type(exc).__name__
                )
                self._stop.wait(self._retry_s)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        # A failing callback must not end the feed: later changes still need hearing.
        try:
            callback(*args)
        except Exception:
            log.exception("could not deliver a %s change", self._name)
