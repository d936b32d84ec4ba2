"""`modelplane score batch` against a real registry (and feature service): the
predictions equal ONNX Runtime's on the same rows, a job killed half way resumes
exactly once, a resume with another model is refused, and bad inputs are named."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from modelplane.cli.main import main
from modelplane.examples import features
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.scoring.batch import ROW_COLUMN, RowGroupCache, _plan_row_ranges
from modelplane.scoring.manifest import MANIFEST_NAME, SUCCESS_NAME
from tests.integration.scoring.conftest import BUNDLE_MODEL, MODEL, WIDTH, ort_outputs
from tests.support import wait_until

FEATURES = [f"f{i}" for i in range(WIDTH)]


def input_table(rows: int, seed: int = 0, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, WIDTH)).astype(np.float32)
    columns: dict[str, object] = {"id": np.arange(first_id, first_id + rows, dtype=np.int64)}
    columns.update({name: x[:, j] for j, name in enumerate(FEATURES)})
    columns["region"] = pa.array([f"r{i % 3}" for i in range(rows)])
    return pa.table(columns)


def write_inputs(folder: Path, files: int, rows: int, row_group: int) -> pa.Table:
    """`files` Parquet files of `rows` rows each in row groups of `row_group`; returns
    all rows in path order (the job's order)."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    for i in range(files):
        table = input_table(rows, seed=i, first_id=i * rows)
        pq.write_table(table, folder / f"part-{i:02d}.parquet", row_group_size=row_group)
        tables.append(table)
    return pa.concat_tables(tables)


def matrix(table: pa.Table) -> np.ndarray:
    return np.column_stack([table[c].to_numpy() for c in FEATURES]).astype(np.float32)


def read_output(folder: Path) -> pa.Table:
    files = sorted(p for p in folder.rglob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in files).sort_by(ROW_COLUMN)


def score(registry, *args: str, model: str = f"{MODEL}@production") -> int:
    return main(
        [
            "score",
            "batch",
            *args,
            "--model",
            model,
            "--registry",
            registry.address,
            "--no-progress",
            "--cache-dir",
            str(registry.artifacts.parent / "score-cache"),
        ]
    )


def test_scores_files_exactly_as_onnx_runtime(registry, tmp_path, capsys):
    path = registry.register(MODEL, seed=1)
    rows = write_inputs(tmp_path / "in", files=3, rows=2_500, row_group=700)
    out = tmp_path / "out"
    code = score(
        registry,
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id",
        "--output",
        str(out),
        "--chunk-rows",
        "1000",
        "--batch-rows",
        "333",
    )
    assert code == 0
    assert "scored 7,500 rows" in capsys.readouterr().out
    # The job's process keeps what a chunk frees for the next (reuse_freed_buffers).
    assert pa.default_memory_pool().backend_name == "jemalloc"
    result = read_output(out)
    assert result[ROW_COLUMN].to_pylist() == list(range(7_500))
    assert result["id"].to_pylist() == rows["id"].to_pylist()
    assert set(result["model"].to_pylist()) == {MODEL}
    assert set(result["model_version"].to_pylist()) == {1}
    predictions = np.array(result["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(path, matrix(rows)))
    assert (out / SUCCESS_NAME).exists()

    # A second run of the finished job scores nothing and changes nothing.
    before = sorted(p.name for p in out.rglob("part-*"))
    assert (
        score(
            registry,
            str(tmp_path / "in"),
            "--features",
            ",".join(FEATURES),
            "--keys",
            "id",
            "--output",
            str(out),
            "--chunk-rows",
            "1000",
        )
        == 0
    )
    assert "scored 0 rows" in capsys.readouterr().out
    assert sorted(p.name for p in out.rglob("part-*")) == before


def test_csv_and_sql_inputs_give_the_same_predictions(registry, tmp_path):
    path = registry.register(MODEL, seed=2)
    rows = input_table(3_000, seed=5)
    pa_csv.write_csv(rows, tmp_path / "rows.csv")
    db = tmp_path / "rows.db"
    with sqlite3.connect(db) as connection:
        names = ["id", *FEATURES, "region"]
        connection.execute(f"CREATE TABLE rows ({', '.join(names)})")
        connection.executemany(
            f"INSERT INTO rows VALUES ({', '.join('?' * len(names))})",
            zip(*(rows[n].to_pylist() for n in names), strict=True),
        )
    common = ["--features", ",".join(FEATURES), "--keys", "id", "--chunk-rows", "800"]
    assert (
        score(registry, str(tmp_path / "rows.csv"), *common, "--output", str(tmp_path / "a")) == 0
    )
    assert (
        score(
            registry,
            "--sql",
            "SELECT * FROM rows ORDER BY id",
            "--db",
            f"sqlite:///{db}",
            *common,
            "--output",
            str(tmp_path / "b"),
        )
        == 0
    )
    expected = ort_outputs(path, matrix(rows))
    for folder in ("a", "b"):
        result = read_output(tmp_path / folder)
        assert result["id"].to_pylist() == rows["id"].to_pylist()
        # CSV and SQLite keep float32 values as decimal text / float64: compare closely.
        predictions = np.array(result["output"].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(predictions, expected, rtol=1e-5, atol=1e-6)


def test_partitioned_output_holds_every_row_once(registry, tmp_path):
    registry.register(MODEL, seed=3)
    write_inputs(tmp_path / "in", files=2, rows=1_000, row_group=300)
    out = tmp_path / "out"
    args = ["--features", ",".join(FEATURES), "--keys", "id,region", "--partition-by", "region"]
    assert (
        score(registry, str(tmp_path / "in"), *args, "--output", str(out), "--chunk-rows", "500")
        == 0
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "region=r0",
        "region=r1",
        "region=r2",
    ]
    result = read_output(out)
    assert result[ROW_COLUMN].to_pylist() == list(range(2_000))


def test_a_sample_of_the_predictions_is_logged_to_monitoring_once(registry, monitoring, tmp_path):
    """Every row (sample 1.0) reaches monitoring as a prediction of the version and route
    "batch"; the finished job run again logs nothing twice."""
    registry.register(MODEL, seed=4)
    write_inputs(tmp_path / "in", files=1, rows=600, row_group=200)
    address, monitor = monitoring
    args = [str(tmp_path / "in"), "--features", ",".join(FEATURES), "--keys", "id"]
    logged = ["--monitoring", address, "--monitoring-sample", "1.0", "--chunk-rows", "200"]
    assert score(registry, *args, "--output", str(tmp_path / "out"), *logged) == 0
    wait_until(lambda: monitor.summary(MODEL).count >= 600, timeout=10)
    assert score(registry, *args, "--output", str(tmp_path / "out"), *logged) == 0
    summary = monitor.summary(MODEL)
    assert [(v.model_version, v.route, v.count) for v in summary.by_version_route] == [
        ("1", "batch", 600)
    ]


def test_bundle_model_scores_the_features_in_force_at_each_rows_time(
    registry, feature_service, tmp_path
):
    address, client = feature_service
    path = registry.register(
        BUNDLE_MODEL,
        seed=4,
        layers=(features.WIDTH, 16, 2),
        feature_input=rpb.FeatureInput(
            bundle=features.SCORER, missing_policy=rpb.MISSING_FEATURE_POLICY_REJECT
        ),
    )
    client.materialize()
    online = client.get_bundle_tensor(features.SCORER, {"customer_id": list(range(1, 41))})
    now = online.as_of_us
    rng = np.random.default_rng(3)
    day = features.DAY_US
    # Past instants (some before a customer's first row: NOT_FOUND, rejected), and
    # every customer at the online read's instant.
    past_ids = rng.integers(1, 41, 300)
    past_times = now - rng.integers(0, 4 * day, 300)
    ids = np.concatenate([past_ids, np.arange(1, 41)])
    times = np.concatenate([past_times, np.full(40, now)])
    entities = pa.table(
        {
            "customer_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array(times, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(entities, tmp_path / "events.parquet", row_group_size=100)
    out = tmp_path / "out"
    code = score(
        registry,
        str(tmp_path / "events.parquet"),
        "--timestamp",
        "event_timestamp",
        "--feature-service",
        address,
        "--output",
        str(out),
        "--chunk-rows",
        "100",
        model=f"{BUNDLE_MODEL}/1",
    )
    assert code == 0
    result = read_output(out)
    assert result["customer_id"].to_pylist() == ids.tolist()

    # Expected: GetTrainingSet for the same rows, the bundle's order, then ORT.
    joined = client.training_set(entities, features.SCORER, statuses=True)
    names = [ref.replace(":", "__") for ref in online.features]
    present = np.column_stack(
        [np.array(joined[f"{n}__status"].to_pylist()) == "PRESENT" for n in names]
    )
    x = np.column_stack([np.array(joined[n].to_pylist(), dtype=object) for n in names])
    x = np.where(present, x, 0).astype(np.float32)
    scored = present.all(axis=1)
    assert 0 < scored.sum() < len(ids)  # both cases occur
    rejected = result["rejected"].to_pylist()
    assert [r is None for r in rejected] == scored.tolist()
    assert all("NOT_FOUND" in r or "STALE" in r or "NULL" in r for r in rejected if r)
    predictions = np.array([p for p in result["output"].to_pylist() if p is not None], np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(path, x[scored]))

    # At the online read's instant, the inputs are exactly the online bundle tensor.
    at_now = np.array(result["output"].to_pylist()[-40:], dtype=np.float32)
    online_scored = (online.statuses == 1).all(axis=1)
    np.testing.assert_array_equal(
        at_now[online_scored], ort_outputs(path, online.values[online_scored])
    )


def _committed(out: Path) -> int:
    if not (out / MANIFEST_NAME).exists():
        return 0
    try:
        with sqlite3.connect(out / MANIFEST_NAME, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM chunks").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def score_command(registry, tmp_path: Path, *extra: str, output: Sequence[str] = ()) -> list[str]:
    """`modelplane score batch` of tmp_path/in into `output` (default: the Parquet folder
    tmp_path/out), 500-row chunks."""
    return [
        sys.executable,
        "-m",
        "modelplane.cli.main",
        "score",
        "batch",
        str(tmp_path / "in"),
        "--model",
        f"{MODEL}@production",
        "--registry",
        registry.address,
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id",
        *(output or ("--output", str(tmp_path / "out"))),
        "--chunk-rows",
        "500",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def kill_after(command: list[str], count: Callable[[], int], committed: int, delay_s: float) -> int:
    """Runs the job, SIGKILLs it once `count()` (the chunks its manifest holds) reaches
    `committed` (each commit followed by `delay_s`, so it is caught half way), and returns
    how many were committed."""
    env = {**os.environ, "MODELPLANE_SCORE_CHUNK_DELAY_S": str(delay_s)}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while count() < committed:
            assert job.poll() is None, job.stderr.read() if job.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)  # ok-sleep: polling a subprocess's file
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    killed_at = count()
    assert committed <= killed_at < 12
    return killed_at


def assert_every_row_once(out: Path, rows: pa.Table, model_path: Path) -> None:
    """The 6,000 input rows, each exactly once, with ONNX Runtime's predictions."""
    result = read_output(out)
    assert result[ROW_COLUMN].to_pylist() == list(range(6_000))  # each row exactly once
    assert result["id"].to_pylist() == rows["id"].to_pylist()
    predictions = np.array(result["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(model_path, matrix(rows)))
    assert not list(out.glob(".tmp-*"))
    assert _committed(out) == 12


def test_a_job_killed_half_way_resumes_exactly_once(registry, tmp_path):
    path = registry.register(MODEL, seed=6)
    rows = write_inputs(tmp_path / "in", files=2, rows=3_000, row_group=500)
    out = tmp_path / "out"
    command = score_command(registry, tmp_path)
    killed_at = kill_after(command, partial(_committed, out), committed=4, delay_s=0.2)
    assert not (out / SUCCESS_NAME).exists()
    # What a crash between a rename and its commit leaves: a part file no chunk names.
    (out / "part-f00001-r000000005500.parquet").write_bytes(b"torn")
    (out / ".tmp-f00001-r000000005000-dead.parquet").write_bytes(b"torn")

    resumed = subprocess.run(
        command, env={**os.environ}, capture_output=True, text=True, timeout=120, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {killed_at} committed chunks" in resumed.stdout
    assert_every_row_once(out, rows, path)


def test_resume_with_another_model_digest_or_options_is_refused(registry, tmp_path, capsys):
    registry.register(MODEL, seed=7)
    write_inputs(tmp_path / "in", files=1, rows=1_000, row_group=250)
    args = [
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--output",
        str(tmp_path / "out"),
    ]
    assert score(registry, *args, "--chunk-rows", "250") == 0
    capsys.readouterr()

    registry.register(MODEL, seed=8)  # production moves to version 2: another digest
    assert score(registry, *args, "--chunk-rows", "250") == 2
    error = capsys.readouterr().err
    assert "another identity" in error and "sha256" in error and "version" in error
    # The original version still resumes (nothing left to do).
    assert score(registry, *args, "--chunk-rows", "250", model=f"{MODEL}/1") == 0
    capsys.readouterr()
    # Other options (chunking) are refused too.
    assert score(registry, *args, "--chunk-rows", "300", model=f"{MODEL}/1") == 2
    assert "chunk_rows" in capsys.readouterr().err


def test_bad_inputs_are_named(registry, tmp_path, capsys):
    registry.register(MODEL, seed=9)
    table = input_table(100).append_column("name", pa.array(["x"] * 100))
    pq.write_table(table, tmp_path / "in.parquet")

    def error(*args: str) -> str:
        assert score(registry, str(tmp_path / "in.parquet"), *args) == 2
        return capsys.readouterr().err

    assert "has no column 'f9'" in error(
        "--features", ",".join([*FEATURES[:7], "f9"]), "--output", str(tmp_path / "a")
    )
    assert "takes 8 values per row; --features names 7 columns" in error(
        "--features", ",".join(FEATURES[:7]), "--output", str(tmp_path / "b")
    )
    assert "feature column 'name' is string; expected numbers" in error(
        "--features", ",".join([*FEATURES[:7], "name"]), "--output", str(tmp_path / "c")
    )
    assert "give --features" in error("--output", str(tmp_path / "d"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    assert "holds no batch manifest" in error(
        "--features", ",".join(FEATURES), "--output", str(tmp_path / "e")
    )


def test_bundle_model_needs_a_timestamp_and_its_entity_keys(
    registry, feature_service, tmp_path, capsys
):
    address, _ = feature_service
    registry.register(
        BUNDLE_MODEL,
        seed=10,
        layers=(features.WIDTH, 4, 2),
        feature_input=rpb.FeatureInput(bundle=features.SCORER),
    )
    pq.write_table(
        pa.table({"user": [1, 2], "t": pa.array([1, 2], pa.timestamp("us"))}),
        tmp_path / "in.parquet",
    )
    base = [str(tmp_path / "in.parquet"), "--feature-service", address]
    model = f"{BUNDLE_MODEL}@production"
    assert score(registry, *base, "--output", str(tmp_path / "a"), model=model) == 2
    assert "needs --timestamp" in capsys.readouterr().err
    assert (
        score(registry, *base, "--timestamp", "t", "--output", str(tmp_path / "b"), model=model)
        == 2
    )
    assert "has no column 'customer_id'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("groups", "chunk", "expected"),
    [
        ([100, 100, 100], 250, [(0, 200), (200, 300)]),
        ([100, 100, 100], 100, [(0, 100), (100, 200), (200, 300)]),
        ([50, 1000, 50], 400, [(0, 50), (50, 383), (383, 716), (716, 1050), (1050, 1100)]),
        ([], 10, []),
    ],
)
def test_chunks_follow_row_groups(groups, chunk, expected):
    assert _plan_row_ranges(groups, chunk) == expected


def test_chunks_that_split_a_row_group_decode_it_once_and_hold_every_row(
    registry, tmp_path, monkeypatch
):
    path = registry.register(MODEL, seed=14)
    rows = write_inputs(tmp_path / "in", files=1, rows=5_000, row_group=5_000)
    decoded: list[list[int]] = []
    read_row_groups = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        decoded.append(list(row_groups))
        return read_row_groups(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    out = tmp_path / "out"
    args = ["--features", ",".join(FEATURES), "--keys", "id", "--chunk-rows", "700"]
    assert score(registry, str(tmp_path / "in"), *args, "--output", str(out)) == 0
    assert decoded == [[0]]  # 8 chunks of the one row group, decoded once
    result = read_output(out)
    assert result[ROW_COLUMN].to_pylist() == list(range(5_000))
    predictions = np.array(result["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(predictions, ort_outputs(path, matrix(rows)))


def test_the_row_group_cache_reads_each_group_once_and_keeps_a_few():
    reads: list[str] = []

    def reader(name: str):
        def read() -> pa.Table:
            reads.append(name)
            return pa.table({"x": [name]})

        return read

    cache = RowGroupCache(capacity=2)
    for key in ("a", "a", "b", "a", "c", "a", "b"):
        assert cache.get((key,), reader(key))["x"].to_pylist() == [key]
    # a, b read; a again from the cache; c evicts b (a was used last); b read again.
    assert reads == ["a", "b", "c", "b"]

    def failing() -> pa.Table:
        raise OSError("disk")

    with pytest.raises(OSError):
        cache.get(("d",), failing)
    assert cache.get(("d",), reader("d"))["x"].to_pylist() == ["d"]  # not cached as failed
