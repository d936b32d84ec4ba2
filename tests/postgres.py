"""The machine's PostgreSQL for tests: each test gets a schema of its own, dropped after,
so tests (and helpers running at the same time) never see each other's tables."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
from psycopg import sql

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
RUN_ID = uuid.uuid4().hex[:8]
T = TypeVar("T")


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


@contextmanager
def store_factory(
    backend: str,
    open_sqlite: Callable[[], T],
    open_postgres: Callable[[str], T],
    prefix: str,
) -> Iterator[Callable[[], T]]:
    """For a contract suite run on every backend: a factory of store instances on one
    database (a SQLite file, or a fresh PostgreSQL schema), each with its own
    connections like separate processes; all closed on exit."""
    opened: list[T] = []

    def opening(open_one: Callable[[], T]) -> Callable[[], T]:
        def factory() -> T:
            store = open_one()
            opened.append(store)
            return store

        return factory

    try:
        if backend == "sqlite":
            yield opening(open_sqlite)
        else:
            with fresh_schema(prefix) as schema:
                yield opening(lambda: open_postgres(schema))
    finally:
        for store in opened:
            store.close()  # type: ignore[attr-defined]
