"""PostgreSQL: for several registry replicas and large catalogues. psycopg 3 with a
connection pool; each mutation locks its model's row (SELECT ... FOR UPDATE), so
concurrent writers to one model queue while other models proceed."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from modelplane.kernel.errors import InvalidArgument, Unavailable
from modelplane.services.registry.store.sql import SqlStore, Tx

log = logging.getLogger("modelplane.registry.postgres")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Any constant works: it only has to be the same for every registry process.
_MIGRATION_LOCK_KEY = 0x6D6F64656C72


class PostgresStore(SqlStore):
    lock_clause = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        schema: str = "",
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout_s: float = 10.0,
    ) -> None:
        kwargs: dict[str, object] = {}
        if schema:
            if not _SCHEMA_NAME.match(schema):
                raise InvalidArgument(f"schema {schema!r} must be a lowercase SQL identifier")
            kwargs["options"] = f"-c search_path={schema}"
        self.schema = schema
        self.url = url
        # One channel per schema, so registries on separate schemas do not hear each other.
        self.channel = "modelplane_registry_" + hashlib.sha256(schema.encode()).hexdigest()[:16]
        self._pool = ConnectionPool(
            url,
            min_size=min_connections,
            max_size=max_connections,
            kwargs=kwargs,
            timeout=connect_timeout_s,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise Unavailable(f"cannot connect to PostgreSQL within {connect_timeout_s}s") from exc
        if schema:
            with self._pool.connection() as conn:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                )
        self.migrate()

    def _dialect(self) -> Mapping[str, str]:
        return {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cursor:
                if not write:
                    # One snapshot for the several SELECTs a read makes.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield Tx(cursor, "%s")
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable(f"PostgreSQL unavailable: {exc.sqlstate or 'connection'}") from exc

    @contextmanager
    def _migration_transaction(self) -> Iterator[Tx]:
        with self._transaction(write=True) as tx:
            # Replicas starting together apply each migration once.
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))
            yield tx

    def _notify(self, tx: Tx, change: Mapping[str, object]) -> None:
        # Delivered to listeners only when (and if) the transaction commits.
        tx.execute("SELECT pg_notify(?, ?)", (self.channel, json.dumps(change)))

    def listener(
        self, on_change: Callable[[dict[str, object]], None], on_gap: Callable[[], None]
    ) -> PostgresChangeListener:
        return PostgresChangeListener(self.url, self.channel, on_change, on_gap)

    def close(self) -> None:
        self._pool.close()


class PostgresChangeListener:
    """Hears the changes every registry process sharing the database commits (LISTEN on
    the schema's channel), on a thread of its own. After a lost connection it reconnects
    and reports a gap: changes committed meanwhile were not heard, so watchers must
    start over from a snapshot."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_change: Callable[[dict[str, object]], None],
        on_gap: Callable[[], None],
        retry_s: float = 1.0,
    ) -> None:
        self._url = url
        self._channel = channel
        self._on_change = on_change
        self._on_gap = on_gap
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-listen", daemon=True)

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
                        self._on_gap()
                    heard_before = True
                    self._listening.set()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            self._deliver(notify.payload)
            except psycopg.Error as exc:
                log.warning("registry change feed lost (%s); reconnecting", type(exc).__name__)
                self._stop.wait(self._retry_s)

    def _deliver(self, payload: str) -> None:
        try:
            self._on_change(json.loads(payload))
        except Exception:
            log.exception("could not deliver a registry change")
