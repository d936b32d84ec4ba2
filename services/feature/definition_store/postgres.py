"""Definitions in PostgreSQL: one catalog for every feature replica.

An apply commits its new versions and a NOTIFY in one transaction; each replica's
listener hears it and reloads its catalog (`DefinitionRegistry.refresh`). Applies from
different replicas queue on one advisory lock, so each plans against the latest
catalog and no two can validate against a state the other is about to change.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import psycopg

from modelplane.kernel.postgres import channel_name, open_pool_with_tables, transaction
from modelplane.services.feature.definition_store import Plan, from_row, to_rows
from modelplane.services.feature.domain import Definition

# Tables carry a feature_ prefix: the schema may be shared with the registry's.
SCHEMA = """
CREATE TABLE IF NOT EXISTS feature_definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    applied_at_us BIGINT NOT NULL,
    PRIMARY KEY (kind, name, version)
);
CREATE TABLE IF NOT EXISTS feature_watermarks (
    view TEXT PRIMARY KEY,
    watermark_us BIGINT NOT NULL
);
"""

LATEST = (
    "SELECT DISTINCT ON (kind, name) kind, version, spec FROM feature_definitions"
    " ORDER BY kind, name, version DESC"
)

# Any constants work: they only have to be the same for every feature process.
_MIGRATION_LOCK_KEY = 0x6D6F66656174
_APPLY_LOCK_KEY = 0x6D6F66656175


class PostgresDefinitionStore:
    def __init__(
        self,
        url: str,
        schema: str = "",
        max_connections: int = 4,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.change_feed = (url, channel_name("modelplane_feature_", schema))
        self._pool = open_pool_with_tables(
            url, schema, max_connections, connect_timeout_s, SCHEMA, _MIGRATION_LOCK_KEY
        )

    def _transaction(self) -> AbstractContextManager[psycopg.Cursor[Any]]:
        return transaction(self._pool)

    def load(self) -> list[Definition]:
        with self._transaction() as cursor:
            rows = cursor.execute(LATEST).fetchall()
        return [from_row(*row) for row in rows]

    def history(self, kind: str, name: str) -> list[Definition]:
        with self._transaction() as cursor:
            rows = cursor.execute(
                "SELECT kind, version, spec FROM feature_definitions"
                " WHERE kind = %s AND name = %s ORDER BY version",
                (kind, name),
            ).fetchall()
        return [from_row(*row) for row in rows]

    def save_with(self, plan: Plan) -> None:
        with self._transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_APPLY_LOCK_KEY,))
            latest = [from_row(*row) for row in cursor.execute(LATEST)]
            rows = to_rows(plan(latest))
            if not rows:
                return
            cursor.executemany(
                "INSERT INTO feature_definitions (kind, name, version, spec, applied_at_us)"
                " VALUES (%s, %s, %s, %s, %s)",
                rows,
            )
            # Heard by every replica's listener once (and only if) this commits.
            cursor.execute("SELECT pg_notify(%s, '{}')", (self.change_feed[1],))

    def watermark(self, view: str) -> int | None:
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT watermark_us FROM feature_watermarks WHERE view = %s", (view,)
            ).fetchone()
        return None if row is None else int(row[0])

    def set_watermark(self, view: str, watermark_us: int) -> None:
        """Moves the watermark forward, never back (replicas may materialize at once)."""
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO feature_watermarks (view, watermark_us) VALUES (%s, %s)"
                " ON CONFLICT (view) DO UPDATE"
                " SET watermark_us = GREATEST(feature_watermarks.watermark_us,"
                " excluded.watermark_us)",
                (view, watermark_us),
            )

    def close(self) -> None:
        self._pool.close()
