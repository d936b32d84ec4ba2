"""The machine's PostgreSQL for tests: each test gets a schema of its own, dropped after,
so tests (and helpers running at the same time) never see each other's tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
RUN_ID = uuid.uuid4().hex[:8]


def drop_schema(schema: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def fresh_schema(prefix: str) -> Iterator[str]:
    """A new schema name (the code under test creates it), dropped on exit."""
    schema = f"{prefix}_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    try:
        yield schema
    finally:
        drop_schema(schema)
