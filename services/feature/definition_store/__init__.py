"""Where definition versions and materialization watermarks live.

SQLite (a file, one feature process) by default; PostgreSQL when several feature
replicas must share one catalog. Both keep every version of every definition as the
JSON document `definitions.to_spec` writes, and both serialize applies: a plan sees the
latest stored definitions under a lock every writer takes, and what it returns is saved
in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from modelplane.services.feature.definitions import Plan, from_spec, to_spec
from modelplane.services.feature.domain import Definition, kind_of

# kind, name, version, spec, applied_at_us
Row = tuple[str, str, int, str, int]


class DefinitionStore(Protocol):
    """Blocking; every method may raise Unavailable when a server store is unreachable."""

    @property
    def change_feed(self) -> tuple[str, str] | None:
        """For a store processes share: the (url, NOTIFY channel) its applies announce on."""
        ...

    def load(self) -> list[Definition]:
        """The latest version of each definition."""
        ...

    def history(self, kind: str, name: str) -> list[Definition]:
        """Every stored version of one definition, oldest first."""
        ...

    def save_with(self, plan: Plan) -> None:
        """Runs `plan` on the latest definitions under the store's write lock and saves
        what it returns in the same transaction: a whole apply or nothing."""
        ...

    def watermark(self, view: str) -> int | None: ...

    def set_watermark(self, view: str, watermark_us: int) -> None: ...

    def close(self) -> None: ...


def to_rows(definitions: Sequence[Definition]) -> list[Row]:
    now = int(time.time() * 1_000_000)
    return [
        (kind_of(d), d.name, d.version, json.dumps(to_spec(d), sort_keys=True), now)
        for d in definitions
    ]


def from_row(kind: str, version: int, spec: str) -> Definition:
    return from_spec(kind, json.loads(spec), version)


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_definition_store(location: str, schema: str = "") -> DefinitionStore:
    """A postgresql:// URL, or the path of a SQLite file."""
    if is_postgres_url(location):
        from modelplane.services.feature.definition_store.postgres import (
            PostgresDefinitionStore,
        )

        return PostgresDefinitionStore(location, schema=schema)
    from modelplane.services.feature.definition_store.sqlite import SqliteDefinitionStore

    return SqliteDefinitionStore(Path(location))
