"""`modelplane score batch --output-db`: predictions into a SQLite or PostgreSQL table
(the machine's PostgreSQL, a fresh schema per test), the same rows as the Parquet
output; a job killed with SIGKILL and re-run holds every row exactly once; a resume
with another model is refused; bad names and combinations are refused."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from modelplane.scoring.batch import ROW_COLUMN
from tests.integration.scoring.conftest import MODEL, ort_outputs
from tests.integration.scoring.test_batch import (
    FEATURES,
    input_table,
    kill_after,
    matrix,
    read_output,
    score,
    score_command,
)
from tests.postgres import POSTGRES_URL, fresh_schema

TABLE = "predictions"
EPOCH = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@dataclass
class Target:
    """An output database: its URL, schema (PostgreSQL) and how to read it."""

    kind: str
    url: str
    schema: str = ""

    def args(self, table: str = TABLE) -> list[str]:
        extra = ["--output-schema", self.schema] if self.schema else []
        return ["--output-db", self.url, "--output-table", table, *extra]

    def query(self, text: str, table: str = TABLE) -> list[tuple[Any, ...]]:
        """`text` with {t}, {m} and {j} naming the table, its manifest and job table."""
        names = {"t": table, "m": f"{table}_manifest", "j": f"{table}_job"}
        if self.kind == "sqlite":
            path = self.url.removeprefix("sqlite:///")
            with sqlite3.connect(path, timeout=5) as db:
                quoted = {k: f'"{v}"' for k, v in names.items()}
                return list(db.execute(text.format(**quoted)).fetchall())
        with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
            composed = sql.SQL(text).format(
                **{k: sql.Identifier(self.schema, v) for k, v in names.items()}
            )
            return list(db.execute(composed).fetchall())

    def committed(self, table: str = TABLE) -> int:
        try:
            return int(self.query("SELECT count(*) FROM {m}", table)[0][0])
        except (sqlite3.Error, psycopg.Error):
            return 0


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "sqlite":
        yield Target("sqlite", f"sqlite:///{tmp_path / 'out.db'}")
        return
    with fresh_schema("scoredb") as schema:
        yield Target("postgres", POSTGRES_URL, schema)


def write_timed_inputs(folder: Path, files: int, rows: int, row_group: int) -> pa.Table:
    """As test_batch.write_inputs, with an event time column."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    for i in range(files):
        table = input_table(rows, seed=i, first_id=i * rows)
        micros = (int(EPOCH.timestamp()) * 1_000_000) + table["id"].to_numpy() * 1_000_003
        table = table.append_column("event_time", pa.array(micros, pa.timestamp("us", tz="UTC")))
        pq.write_table(table, folder / f"part-{i:02d}.parquet", row_group_size=row_group)
        tables.append(table)
    return pa.concat_tables(tables)


def _array(value: Any) -> list[float]:
    return list(json.loads(value)) if isinstance(value, str) else list(value)


def _instant(value: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def test_db_output_holds_exactly_the_parquet_outputs_rows(registry, target, tmp_path, capsys):
    path = registry.register(MODEL, seed=21)
    rows = write_timed_inputs(tmp_path / "in", files=2, rows=1_500, row_group=400)
    common = [
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id,region",
        "--timestamp",
        "event_time",
        "--chunk-rows",
        "500",
        "--batch-rows",
        "128",
    ]
    assert score(registry, *common, "--output", str(tmp_path / "parquet")) == 0
    capsys.readouterr()
    assert score(registry, *common, *target.args()) == 0
    assert "scored 3,000 rows in 8 chunks" in capsys.readouterr().out

    parquet = read_output(tmp_path / "parquet")
    stored = target.query(
        'SELECT model, model_version, input_row, id, region, event_time, scored_at, "output" '
        "FROM {t} ORDER BY input_row"
    )
    assert [r[2] for r in stored] == parquet[ROW_COLUMN].to_pylist() == list(range(3_000))
    assert [r[3] for r in stored] == parquet["id"].to_pylist() == rows["id"].to_pylist()
    assert [r[4] for r in stored] == parquet["region"].to_pylist()
    assert {r[0] for r in stored} == {MODEL}
    assert [r[1] for r in stored] == parquet["model_version"].to_pylist()
    assert [_instant(r[5]) for r in stored] == parquet["event_time"].to_pylist()
    assert all(_instant(r[6]).tzinfo is not None for r in stored)
    from_db = np.array([_array(r[7]) for r in stored], dtype=np.float32)
    from_parquet = np.array(parquet["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(from_db, from_parquet)
    np.testing.assert_array_equal(from_db, ort_outputs(path, matrix(rows)))
    assert target.committed() == 8
    assert target.query("SELECT finished FROM {j}")[0][0] is not None

    # The finished job, run again, scores nothing and changes nothing.
    assert score(registry, *common, *target.args()) == 0
    assert "scored 0 rows" in capsys.readouterr().out
    assert target.query("SELECT count(*) FROM {t}")[0][0] == 3_000


def test_nan_outputs_are_stored_as_the_database_takes_them(registry, target, tmp_path, capsys):
    """A row with a NaN feature has NaN outputs: PostgreSQL keeps NaN in its real[]; JSON
    has no NaN, so SQLite's JSON text holds null there (still valid for its JSON
    functions), and the other rows' values are untouched."""
    registry.register(MODEL, seed=21)
    rows = input_table(6)
    features = rows[FEATURES[0]].to_numpy().copy()
    features[2] = np.nan
    rows = rows.set_column(rows.column_names.index(FEATURES[0]), FEATURES[0], pa.array(features))
    (tmp_path / "in").mkdir()
    pq.write_table(rows, tmp_path / "in" / "part.parquet")
    args = [str(tmp_path / "in"), "--features", ",".join(FEATURES), "--keys", "id"]
    assert score(registry, *args, *target.args()) == 0
    capsys.readouterr()
    stored = target.query('SELECT input_row, "output" FROM {t} ORDER BY input_row')
    if target.kind == "sqlite":
        assert all(v is None for v in json.loads(stored[2][1]))
        valid = target.query('SELECT count(*) FROM {t} WHERE json_valid("output")')
        assert valid[0][0] == 6
    else:
        assert all(np.isnan(v) for v in stored[2][1])
    for row, value in stored[:2] + stored[3:]:
        assert all(np.isfinite(_array(value))), row


def test_every_column_kind_reads_back_as_written(target):
    """The chunk's columns, converted in bulk (Arrow, one COPY on PostgreSQL), read back
    as the values they hold: a sliced chunk, null lists, a naive timestamp taken as UTC,
    a date as midnight UTC, quotes, commas and newlines in text, an empty string apart
    from a null, integer and string lists, and a type neither database has (as text)."""
    import decimal

    rows = 7
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * rows, dtype=np.float32)), 2)
    table = pa.table(
        {
            "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), ["m"]),
            "id": pa.array(range(rows), pa.int64()),
            "text": ['a,"b"\n', "", None, "é", "x", "y", "z"],
            "flag": [True, False, None, True, True, False, True],
            "naive": pa.array([EPOCH.replace(tzinfo=None)] * rows, pa.timestamp("us")),
            "day": pa.array([dt.date(2026, 12, 1)] * rows),
            "vector": pa.array(
                [*vectors.to_pylist()[:2], None, *vectors.to_pylist()[3:]],
                pa.list_(pa.float32(), 2),
            ),
            "counts": pa.array([[1, 2], [], None, [3], [4], [5], [6]], pa.list_(pa.int64())),
            "tags": pa.array([["a", "b"], None, [], ["c"], ["d"], ["e"], ["f"]]),
            "price": pa.array([decimal.Decimal("1.25")] * rows, pa.decimal128(5, 2)),
        }
    ).slice(1)
    from modelplane.scoring.db_output import DbOutput

    output = DbOutput.open(target.url, TABLE, target.schema, {"job": "kinds"})
    try:
        output.commit("c1", table)
    finally:
        output.close()
    got = target.query(
        "SELECT model, id, text, flag, naive, day, vector, counts, tags, price FROM {t} ORDER BY id"
    )
    expected = table.to_pylist()
    assert [r[0] for r in got] == ["m"] * 6
    assert [r[1] for r in got] == [e["id"] for e in expected]
    assert [r[2] for r in got] == [e["text"] for e in expected]
    assert [None if r[3] is None else bool(r[3]) for r in got] == [e["flag"] for e in expected]
    assert {_instant(r[4]) for r in got} == {EPOCH}
    assert {_instant(r[5]) for r in got} == {EPOCH}
    assert [None if r[6] is None else _array(r[6]) for r in got] == [e["vector"] for e in expected]
    assert [None if r[7] is None else _array(r[7]) for r in got] == [e["counts"] for e in expected]
    tags = [None if r[8] is None else _array(r[8]) for r in got]
    assert tags == [e["tags"] for e in expected]
    assert {r[9] for r in got} == {"1.25"}


def test_a_db_job_killed_half_way_resumes_exactly_once(registry, target, tmp_path):
    path = registry.register(MODEL, seed=22)
    rows = write_timed_inputs(tmp_path / "in", files=2, rows=3_000, row_group=500)
    command = score_command(registry, tmp_path, output=target.args())
    killed_at = kill_after(command, target.committed, committed=4, delay_s=0.2)
    assert target.query("SELECT finished FROM {j}")[0][0] is None
    # Nothing of an uncommitted chunk survived the kill: the rows are the committed ones.
    assert target.query("SELECT count(*) FROM {t}")[0][0] == 500 * killed_at

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {killed_at} committed chunks" in resumed.stdout
    stored = target.query('SELECT input_row, id, "output" FROM {t} ORDER BY input_row')
    assert [r[0] for r in stored] == list(range(6_000))  # every row exactly once
    assert [r[1] for r in stored] == rows["id"].to_pylist()
    predictions = np.array([_array(r[2]) for r in stored], dtype=np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(path, matrix(rows)))
    assert target.committed() == 12
    assert target.query("SELECT sum(rows) FROM {m}")[0][0] == 6_000

    # A resume with another model digest (production moved to a new version) is refused.
    registry.register(MODEL, seed=23)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2
    assert "another identity" in refused.stderr and "sha256" in refused.stderr
    assert target.query("SELECT count(*) FROM {t}")[0][0] == 6_000


def test_resume_with_another_model_or_options_is_refused(registry, target, tmp_path, capsys):
    registry.register(MODEL, seed=24)
    write_timed_inputs(tmp_path / "in", files=1, rows=1_000, row_group=250)
    args = [str(tmp_path / "in"), "--features", ",".join(FEATURES), *target.args()]
    assert score(registry, *args, "--chunk-rows", "250") == 0
    capsys.readouterr()
    registry.register(MODEL, seed=25)  # another digest behind production
    assert score(registry, *args, "--chunk-rows", "250") == 2
    error = capsys.readouterr().err
    assert "another identity" in error and "sha256" in error
    assert score(registry, *args, "--chunk-rows", "250", model=f"{MODEL}/1") == 0
    capsys.readouterr()
    assert score(registry, *args, "--chunk-rows", "300", model=f"{MODEL}/1") == 2
    assert "chunk_rows" in capsys.readouterr().err
    assert target.query("SELECT count(*) FROM {t}")[0][0] == 1_000


def test_bad_names_and_combinations_are_refused(registry, tmp_path, capsys):
    registry.register(MODEL, seed=26)
    write_timed_inputs(tmp_path / "in", files=1, rows=100, row_group=100)
    db = tmp_path / "out.db"
    base = [str(tmp_path / "in"), "--features", ",".join(FEATURES)]

    def error(*args: str) -> str:
        assert score(registry, *base, *args) == 2
        return capsys.readouterr().err

    url = f"sqlite:///{db}"
    assert "SQL identifier" in error("--output-db", url, "--output-table", "x; DROP TABLE y")
    assert "SQL identifier" in error("--output-db", url, "--output-table", "1abc")
    assert "either --output" in error("--output-db", url, "--output", str(tmp_path / "o"))
    assert "either --output" in error()
    assert "takes --output-table" in error("--output-db", url)
    assert "PostgreSQL only" in error(
        "--output-db", url, "--output-table", "t", "--output-schema", "s"
    )
    assert "--engine ray" in error("--output-db", url, "--output-table", "t", "--engine", "ray")
    assert "--partition-by" in error(
        "--output-db", url, "--output-table", "t", "--keys", "id", "--partition-by", "id"
    )
    # A table that exists but holds no job is not written into.
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE mine (x INTEGER)")
    assert "holds no batch job" in error("--output-db", url, "--output-table", "mine")
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM mine").fetchone()[0] == 0


def test_a_query_scored_into_a_table_of_the_same_sqlite_file(registry, tmp_path, capsys):
    """The input query's open cursor does not block the chunks' commits (WAL)."""
    path = registry.register(MODEL, seed=27)
    rows = input_table(2_000, seed=8)
    db = tmp_path / "both.db"
    names = ["id", *FEATURES]
    with sqlite3.connect(db) as connection:
        connection.execute(f"CREATE TABLE events ({', '.join(names)})")
        connection.executemany(
            f"INSERT INTO events VALUES ({', '.join('?' * len(names))})",
            zip(*(rows[n].to_pylist() for n in names), strict=True),
        )
    url = f"sqlite:///{db}"
    code = score(
        registry,
        "--sql",
        "SELECT * FROM events ORDER BY id",
        "--db",
        url,
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id",
        "--chunk-rows",
        "300",
        "--output-db",
        url,
        "--output-table",
        "scores",
    )
    assert code == 0, capsys.readouterr().err
    target = Target("sqlite", url)
    stored = target.query('SELECT id, "output" FROM {t} ORDER BY input_row', "scores")
    assert [r[0] for r in stored] == rows["id"].to_pylist()
    predictions = np.array([_array(r[1]) for r in stored], dtype=np.float32)
    # SQLite keeps the float32 features as float64: compare closely.
    np.testing.assert_allclose(predictions, ort_outputs(path, matrix(rows)), rtol=1e-5, atol=1e-6)
    assert target.committed("scores") == 7
