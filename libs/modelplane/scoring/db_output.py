"""A batch job's output in a database table (SQLite or PostgreSQL) instead of Parquet
files, exactly once.

The commit protocol, per chunk, is one database transaction: the chunk's rows are
inserted into the output table and its row into `<table>_manifest`; the transaction
commits both or neither. A chunk is done if and only if its manifest row exists, and
a crash (SIGKILL included) before the commit leaves nothing of the chunk: the database
rolls the open transaction back. So a re-run skips committed chunks and every input
row is in the table exactly once. `input_row` is the table's primary key as well, so a
second writer of the same job (two runs at once) fails instead of duplicating rows;
on PostgreSQL the job also holds an advisory lock on the table for its life.

`<table>_job` holds the job's identity (input, model digest, options: the same as the
Parquet manifest's), checked on a resume as manifest.py does, and when it finished.

Columns are the Parquet output's: model, model_version, input_row, the keys, the
timestamp, scored_at, each model output and (for a bundle whose policy rejects
missing features) rejected. A single-value output is a float column; a multi-value
one a `real[]`/`double precision[]` array on PostgreSQL, JSON text on SQLite (where
NaN and infinities, which JSON lacks, are null);
timestamps are `timestamptz` on PostgreSQL, ISO 8601 text (UTC) on SQLite.
"""

from __future__ import annotations

import io
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from modelplane.scoring.manifest import CommittedChunk, JobRunning, ManifestMismatch, check_identity

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_IDENTIFIER = 63  # PostgreSQL's limit, kept on SQLite too
MANIFEST_SUFFIX = "_manifest"
JOB_SUFFIX = "_job"


class OutputDbError(ValueError):
    """A database output that cannot be used (URL, name, an unrelated table)."""


def sqlite_path(url: str) -> str:
    """sqlite:///relative/path or sqlite:////absolute/path, as SQLAlchemy spells them."""
    return url.removeprefix("sqlite:").removeprefix("//").removeprefix("/")


def check_identifier(name: str, what: str, room: int = 0) -> str:
    """`name` if it is a plain SQL identifier (letters, digits, underscores, not first a
    digit) short enough to take a suffix of `room` characters; never interpolated
    otherwise."""
    if not IDENTIFIER.fullmatch(name) or len(name) + room > MAX_IDENTIFIER:
        raise OutputDbError(
            f"{what} {name[:80]!r}: expected an SQL identifier (letters, digits and _, not "
            f"starting with a digit, at most {MAX_IDENTIFIER - room} characters)"
        )
    return name


def _quote(name: str) -> str:
    """A SQLite identifier in double quotes (any name: quotes are doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _is_array(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    )


def _column_type(kind: pa.DataType, postgres: bool) -> str:
    if pa.types.is_boolean(kind):
        return "BOOLEAN" if postgres else "INTEGER"
    if pa.types.is_integer(kind):
        return "BIGINT" if postgres else "INTEGER"
    if pa.types.is_float32(kind):
        return "REAL"
    if pa.types.is_floating(kind):
        return "DOUBLE PRECISION" if postgres else "REAL"
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return "TIMESTAMPTZ" if postgres else "TEXT"
    if _is_array(kind):
        if not postgres:
            return "TEXT"  # JSON
        value = kind.value_type
        if pa.types.is_float32(value):
            return "REAL[]"
        if pa.types.is_floating(value):
            return "DOUBLE PRECISION[]"
        if pa.types.is_integer(value):
            return "BIGINT[]"
        return "JSONB"
    return "TEXT"


def _json_array(values: list[Any]) -> str:
    """A list as JSON text. JSON has no NaN or infinity (Python would write the bare word
    `NaN`, which SQLite's JSON functions and PostgreSQL's JSONB refuse): those values are
    stored as null, as SQLite stores a NaN REAL."""
    return json.dumps(_finite(values), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _array_text(column: pa.Array, postgres: bool) -> pa.Array:
    """A numeric list column as text, element by element in Arrow (a Python conversion
    per row was most of a chunk's write time): PostgreSQL array literals `{1.5,2}`, or
    JSON `[1.5,2]` with null for NaN and infinities. Floats are written shortest
    round-trip, so the stored text reads back as the same float."""
    lists = column.cast(pa.list_(column.type.value_type))  # fixed-size and large alike
    values = lists.values
    text = pc.cast(values, pa.string())
    if not postgres and pa.types.is_floating(values.type):
        text = pc.if_else(pc.is_finite(values), text, pa.scalar("null"))
    joined = pc.binary_join(
        pa.ListArray.from_arrays(lists.offsets, text, mask=lists.is_null()), ","
    )
    open_, close = ("{", "}") if postgres else ("[", "]")
    return pc.binary_join_element_wise(open_, joined, close, "")


def _db_column(column: pa.ChunkedArray, postgres: bool) -> pa.Array:
    """A column in the form the database stores, converted in Arrow: dictionaries
    decoded, dates and timestamps as UTC instants (a naive timestamp is taken as UTC;
    ISO 8601 text on SQLite), numeric lists as array literals (PostgreSQL) or JSON text
    (SQLite), other lists as JSON text, types neither database has as their text."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_date(kind):
        array = array.cast(pa.timestamp("s"))
        kind = array.type
    if pa.types.is_timestamp(kind):
        array = array.cast(pa.timestamp(kind.unit, tz="UTC"))
        if postgres:
            return array
        return pc.strftime(array, format="%Y-%m-%dT%H:%M:%S+00:00")
    if _is_array(kind):
        value = kind.value_type
        if pa.types.is_floating(value) or pa.types.is_integer(value):
            return _array_text(array, postgres)
        return pa.array([None if v is None else _json_array(v) for v in array.to_pylist()])
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    ):
        return array
    return pa.array([None if v is None else str(v) for v in array.to_pylist()], pa.string())


def _python_values(array: pa.Array) -> list[Any]:
    """A column's values as Python objects for the SQLite driver (numbers through
    numpy: several times faster than Arrow's per-value conversion)."""
    kind = array.type
    if not array.null_count and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return list(array.to_numpy().tolist())
    return list(array.to_pylist())


def _csv(table: pa.Table) -> bytes:
    """The rows as CSV for PostgreSQL's COPY: a null is an empty unquoted field, a string
    always quoted (so an empty string stays one)."""
    sink = io.BytesIO()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False))
    return sink.getvalue()


class DbOutput:
    """One job's output table and manifest in a database. `open` creates the tables if
    missing and checks (or records) the job's identity; `commit` writes a chunk's rows
    and its manifest row in one transaction."""

    def __init__(self, url: str, table: str, schema: str = "") -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise OutputDbError("--output-db: expected sqlite:///PATH or postgresql://...")
        self.postgres = scheme != "sqlite"
        if schema and not self.postgres:
            raise OutputDbError("--output-schema is for PostgreSQL only")
        room = max(len(MANIFEST_SUFFIX), len(JOB_SUFFIX))
        self.table = check_identifier(table, "--output-table", room)
        self.schema = check_identifier(schema, "--output-schema") if schema else ""
        self.url = url
        self._table_ready = False
        self._connection: Any
        if self.postgres:
            import psycopg

            try:
                # Autocommit: each transaction is begun explicitly (`transaction()`), so a
                # read never leaves one open under the next commit.
                self._connection = psycopg.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise OutputDbError(f"--output-db: cannot connect: {exc}") from None
        else:
            path = sqlite_path(url)
            if not path:
                raise OutputDbError("--output-db: sqlite:///PATH names no file")
            # Autocommit mode: transactions are begun explicitly (BEGIN IMMEDIATE).
            self._connection = sqlite3.connect(
                path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            # WAL: readers (reports, or this job's own --sql input in the same file) do not
            # block a chunk's commit, nor it them.
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")

    @property
    def description(self) -> str:
        from modelplane.scoring.batch import redact

        qualified = f"{self.schema}.{self.table}" if self.schema else self.table
        return f"{redact(self.url)} table {qualified}"

    # --- names ----------------------------------------------------------------------

    def _name(self, suffix: str = "") -> Any:
        """The (schema-qualified) name of the output table or a companion, quoted."""
        name = self.table + suffix
        if self.postgres:
            from psycopg import sql

            if self.schema:
                return sql.Identifier(self.schema, name)
            return sql.Identifier(name)
        return _quote(name)

    def _sql(self, template: str, **names: Any) -> Any:
        """A statement with quoted names in it: psycopg's composition on PostgreSQL,
        already-quoted identifiers on SQLite."""
        if self.postgres:
            from psycopg import sql

            return sql.SQL(template).format(**names)
        return template.format(**names)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self.postgres:
            with self._connection.transaction():
                yield self._connection
            return
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield self._connection
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def _table_exists(self, suffix: str = "") -> bool:
        name = self.table + suffix
        if self.postgres:
            row = self._connection.execute(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = "
                "COALESCE(%s, current_schema()) AND table_name = %s",
                (self.schema or None, name),
            ).fetchone()
        else:
            row = self._connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
        return row is not None

    # --- the job --------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, table: str, schema: str, identity: Mapping[str, Any]) -> DbOutput:
        """The output of the job `identity` (its tables created if new; the output table
        itself with the first chunk, from that chunk's columns). Refuses a table that
        holds another job, or an existing table with no job recorded next to it."""
        output = cls(url, table, schema)
        try:
            output._lock()
            output._claim(identity)
        except BaseException:
            output.close()
            raise
        return output

    def _lock(self) -> None:
        """PostgreSQL: a session advisory lock on the table, held for the job's life (two
        runs at once would only fail on the primary keys; this says why up front)."""
        if not self.postgres:
            return
        key = f"modelplane.score.batch:{self.schema}.{self.table}"
        row = self._connection.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
        ).fetchone()
        if not row[0]:
            raise JobRunning(f"another job is writing {self.description}")

    def _claim(self, identity: Mapping[str, Any]) -> None:
        wanted = json.loads(json.dumps(identity, sort_keys=True))
        number = "BIGINT" if self.postgres else "INTEGER"
        real = "DOUBLE PRECISION" if self.postgres else "REAL"
        with self._transaction() as db:
            if self.postgres and self.schema:
                from psycopg import sql

                db.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            existed = self._table_exists()
            db.execute(
                self._sql(
                    "CREATE TABLE IF NOT EXISTS {job} (identity TEXT NOT NULL, created "
                    + real
                    + " NOT NULL, finished "
                    + real
                    + ")",
                    job=self._name(JOB_SUFFIX),
                )
            )
            db.execute(
                self._sql(
                    "CREATE TABLE IF NOT EXISTS {manifest} (chunk_id TEXT PRIMARY KEY, rows "
                    + number
                    + " NOT NULL, committed_at "
                    + real
                    + " NOT NULL)",
                    manifest=self._name(MANIFEST_SUFFIX),
                )
            )
            row = db.execute(self._sql("SELECT identity FROM {job}", job=self._name(JOB_SUFFIX)))
            row = row.fetchone()
            if row is None:
                if existed:
                    raise ManifestMismatch(
                        f"{self.description} exists and holds no batch job "
                        f"({self.table}{JOB_SUFFIX}); give a new --output-table"
                    )
                db.execute(
                    self._sql(
                        "INSERT INTO {job} VALUES (" + ", ".join([self._mark] * 3) + ")",
                        job=self._name(JOB_SUFFIX),
                    ),
                    (json.dumps(wanted, sort_keys=True), time.time(), None),
                )
        if row is not None:
            check_identity(row[0], wanted, self.description, "--output-table")

    @property
    def _mark(self) -> str:
        return "%s" if self.postgres else "?"

    def _create_table(self, db: Any, columns: pa.Schema) -> None:
        """The output table, if missing, with the columns of a chunk's output."""
        definitions = []
        for column in columns:
            kind = column.type
            if pa.types.is_dictionary(kind):
                kind = kind.value_type
            if column.name == "input_row":
                definitions.append(("input_row", "BIGINT PRIMARY KEY"))
            elif column.name in ("model", "model_version", "scored_at"):
                definitions.append((column.name, _column_type(kind, self.postgres) + " NOT NULL"))
            else:
                definitions.append((column.name, _column_type(kind, self.postgres)))
        if self.postgres:
            from psycopg import sql

            body = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
                for name, kind in definitions
            )
            db.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(self._name(), body))
        else:
            body_text = ", ".join(f"{_quote(name)} {kind}" for name, kind in definitions)
            db.execute(f"CREATE TABLE IF NOT EXISTS {self._name()} ({body_text})")

    def identity(self) -> dict[str, Any]:
        row = self._connection.execute(
            self._sql("SELECT identity FROM {job}", job=self._name(JOB_SUFFIX))
        ).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def committed(self) -> dict[str, CommittedChunk]:
        rows = self._connection.execute(
            self._sql("SELECT chunk_id, rows FROM {manifest}", manifest=self._name(MANIFEST_SUFFIX))
        ).fetchall()
        return {chunk_id: CommittedChunk(chunk_id, int(count), ()) for chunk_id, count in rows}

    def commit(self, chunk_id: str, output: pa.Table) -> None:
        """The chunk's rows and its manifest row, in one transaction."""
        names = list(output.column_names)
        columns = [_db_column(output[name], self.postgres) for name in names]
        with self._transaction() as db:
            if not self._table_ready:
                self._create_table(db, output.schema)
            if self.postgres:
                from psycopg import sql

                statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
                    self._name(), sql.SQL(", ").join(sql.Identifier(n) for n in names)
                )
                with db.cursor() as cursor, cursor.copy(statement) as copy:
                    copy.write(_csv(pa.table(columns, names=names)))
            else:
                quoted = ", ".join(_quote(n) for n in names)
                marks = ", ".join("?" * len(names))
                rows = zip(*(_python_values(c) for c in columns), strict=True)
                db.executemany(f"INSERT INTO {self._name()} ({quoted}) VALUES ({marks})", rows)
            db.execute(
                self._sql(
                    "INSERT INTO {manifest} VALUES (" + ", ".join([self._mark] * 3) + ")",
                    manifest=self._name(MANIFEST_SUFFIX),
                ),
                (chunk_id, output.num_rows, time.time()),
            )
        self._table_ready = True

    def finish(self) -> None:
        """Records that every chunk is committed (the table's `_SUCCESS`)."""
        with self._transaction() as db:
            db.execute(
                self._sql("UPDATE {job} SET finished = " + self._mark, job=self._name(JOB_SUFFIX)),
                (time.time(),),
            )

    def close(self) -> None:
        self._connection.close()
