"""PostgreSQL: for several registry replicas and large catalogues. psycopg 3 with a
connection pool; each mutation locks its model's row (SELECT ... FOR UPDATE), so
concurrent writers to one model queue while other models proceed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import psycopg
from psycopg_pool import PoolTimeout

from modelplane.kernel.errors import Unavailable
from modelplane.kernel.postgres import PostgresChangeListener, channel_name, open_pool
from modelplane.services.registry.store.sql import SqlStore, Tx

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
        self.schema = schema
        self.url = url
        self.channel = channel_name("modelplane_registry_", schema)
        self._pool = open_pool(url, schema, min_connections, max_connections, connect_timeout_s)
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
        return PostgresChangeListener(self.url, self.channel, on_change, on_gap, "registry")

    def close(self) -> None:
        self._pool.close()
